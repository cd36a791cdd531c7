"""CVAT integration: a cvat-sdk auto-annotation function and a nuclio handler, both over the saliency client."""
