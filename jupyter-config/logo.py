"""Draw the kernel spec's logos (logo-32x32.png, logo-64x64.png) next to kernel.json.

Four Macs cabled in a ring, on a rounded dark square. Drawn large and scaled down, so the small
sizes stay smooth. Run again after changing the design: python jupyter-config/logo.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "kernels" / "mlx-cluster"
BACKGROUND = (30, 41, 59, 255)  # slate
CABLE = (56, 189, 248, 255)  # sky blue
NODE = (255, 255, 255, 255)
NODE_EDGE = (251, 146, 60, 255)  # orange


def draw(size: int = 512) -> Image.Image:
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 5, fill=BACKGROUND)
    lo, hi = size * 0.28, size * 0.72
    nodes = [(lo, lo), (hi, lo), (hi, hi), (lo, hi)]
    cable = round(size * 0.06)
    for a, b in zip(nodes, nodes[1:] + nodes[:1]):
        d.line((a, b), fill=CABLE, width=cable)
    r, ring = size * 0.12, round(size * 0.045)
    for x, y in nodes:
        d.ellipse((x - r, y - r, x + r, y + r), fill=NODE, outline=NODE_EDGE, width=ring)
    return img


def main() -> None:
    big = draw()
    for px in (32, 64):
        big.resize((px, px), Image.Resampling.LANCZOS).save(HERE / f"logo-{px}x{px}.png")


if __name__ == "__main__":
    main()
