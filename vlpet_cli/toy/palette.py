"""The toy world's palette: the shapes, colours and backgrounds its pictures (images.py) and clips (videos.py)
draw, and that their questions and captions name. Order matters: answers, choices and the tiny models' tags
follow it, so changing it changes every file of the world."""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (200, 200, 200), "cream": (245, 235, 205)}
