"""A prediction's score from the map's faithfulness metrics (the service's `outputs=metrics`), in [0, 1].

The service plays the deletion and insertion games (RISE, Petsiuk et al. 2018): the explained class's softmax
probability as the map's most salient pixels are replaced by a substrate (deletion), or restored into it
(insertion), in K steps; the same again in a random order of the pixels. Both games run between the same two
images, so every curve runs between the same two probabilities: p0 on the photo as it is, p1 on the fully
substituted one.

The score is how much of the possible improvement over the random order the map achieves, per game, averaged:

    deletion:  gain_d = (D_random - D) / (D_random - D_ideal),  D_ideal = p1 + (p0 - p1) / (2K)
    insertion: gain_i = (I - I_random) / (I_ideal - I_random),  I_ideal = p0 - (p0 - p1) / (2K)
    score = mean(clip(gain_d, 0, 1), clip(gain_i, 0, 1))

where D, I are the map's AUCs and the ideal curves are the step curves [p0, p1, ..., p1] (deletion: the first
step's pixels hold all the evidence) and [p1, p0, ..., p0] (insertion), whose trapezoid areas over x in [0, 1]
are D_ideal and I_ideal. Why this form:
- A map no better than a random order scores 0 (its gain is 0 in both games), whatever the model, class or
  substrate: the random order is the baseline the service measures beside each map, on the same image.
- Each gain is a fraction of the room there is: raw AUC differences shrink with p0 - p1 (a class the model
  gives 0.2 cannot lose 0.9), so a plain difference would score confident predictions above faithful maps.
- Clipping each game before averaging: a map worse than random in one game scores 0 there rather than
  cancelling the other game (Grad-CAM on skimage's chelsea: near ideal on insertion, gain 0.98, worse than
  random on blur deletion, -0.57; score 0.49, where the plain gradient's map scores 0.08); a curve that
  overshoots the ideal (deletion below p1, insertion above p0: the substrate alone is evidence against, or the
  restored pixels alone for, the class) counts as ideal.
- The games measure nothing when the substrate takes little of the class's probability away (p0 - p1 under a
  tenth of p0: e.g. a blur that keeps what the model looks at): their curves are then wiggles around p0, and
  any ratio of them is noise. The score is then 0: nothing shows the map to be faithful. A single game with no
  room (its random curve within 2% of p0 - p1 of the ideal) cannot tell maps apart either, and is left out of
  the mean.

Reading it: 1 needs all the evidence in the first step's pixels (1/K of the image). A perfect map of evidence
spread over a fraction f of the image scores about (1 - f) / (1 - 1/K) where the random curve is near linear:
on a planted model whose class depends on the mean of one patch a quarter of the image, the true map scores
0.79 at K = 20 with the black substrate, and 0 with blur, which keeps the patch's mean (tests). The random
baseline is one draw of a random order, so a score below about 0.1 is not told apart from a random map's."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_DROP = 0.1  # the substrate must take at least this fraction of the class's probability p0 away
ROOM_FRACTION = 0.02  # a game whose room is under this fraction of p0 - p1 cannot tell maps apart


def game_gains(metrics: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(deletion gain, insertion gain), unclipped: 0 for the random order, 1 for the ideal step curve; None
    for a game that cannot tell maps apart."""
    deletion = [float(p) for p in metrics["deletion_curve"]]
    if len(deletion) < 2:
        raise ValueError("a deletion curve needs at least 2 points")
    steps = len(deletion) - 1
    p0, p1 = deletion[0], deletion[-1]  # the photo; the fully substituted image (every curve's end points)
    span = p0 - p1
    if not span >= MIN_DROP * p0 or not span > 0:
        return None, None
    ideal_deletion = p1 + span / (2 * steps)
    ideal_insertion = p0 - span / (2 * steps)

    def gain(better: float, room: float) -> float | None:
        return better / room if room > ROOM_FRACTION * span else None

    d, d_random = float(metrics["deletion_auc"]), float(metrics["deletion_auc_random"])
    i, i_random = float(metrics["insertion_auc"]), float(metrics["insertion_auc_random"])
    return gain(d_random - d, d_random - ideal_deletion), gain(i - i_random, ideal_insertion - i_random)


def faithfulness_score(metrics: Mapping[str, Any]) -> float:
    """The map's faithfulness in [0, 1] from one result's `metrics` (see the module's docstring)."""
    gains = [min(max(g, 0.0), 1.0) for g in game_gains(metrics) if g is not None]
    return math.fsum(gains) / len(gains) if gains else 0.0


def describe(metrics: Mapping[str, Any], score: float, label: str, probability: float) -> str:
    """One line of the raw figures, for the region's meta text in Label Studio."""
    stability = metrics.get("stability")
    text = (f"faithfulness {score:.2f}: deletion AUC {metrics['deletion_auc']:.3f} (random order "
            f"{metrics['deletion_auc_random']:.3f}, lower is better), insertion AUC "
            f"{metrics['insertion_auc']:.3f} (random order {metrics['insertion_auc_random']:.3f}, higher is "
            f"better); {metrics['steps']} steps, {metrics['replacement']} substrate; "
            f"{label} p={probability:.3f}")
    if stability is not None:
        text += f"; stability {stability:.2f}"
    return text
