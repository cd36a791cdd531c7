"""CVAT integration: a cvat-sdk auto-annotation function and a nuclio handler, over the saliency client."""
