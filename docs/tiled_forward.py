#!/usr/bin/env python3
"""docs/tiled_forward.py: draws docs/tiled_forward.svg, the picture of the tiled GOAT forward (v2, v3).

Python 3 standard library only. Run from anywhere: python3 docs/tiled_forward.py
Left: the causal score matrix (queries i down, keys j across), one query tile Q_i of B_r rows and the key tiles
K_j, V_j of B_c keys it visits, left to right up to the diagonal. Right: one tile pair enlarged, with the kappa
slice it reads (one entry per diagonal i - j, drawn where each diagonal leaves the tile) and the u slice (one
entry per key column). Bottom: what one step of the loop computes.
"""
import os
import re

W, H = 820, 672
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
out = []


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def text(x, y, s, size=12, anchor="start", weight="normal", fill="#222", italic=False, rotate=None):
    """Text with _{sub} and ^{sup} markup turned into shifted tspans."""
    parts = re.split(r"(_\{[^}]*\}|\^\{[^}]*\})", s)
    small = round(size * 0.72, 1)
    body, level = [], 0
    for p in parts:
        if not p:
            continue
        if p.startswith("_{") or p.startswith("^{"):
            target = round(size * 0.3) if p[0] == "_" else -round(size * 0.4)
            body.append(f'<tspan dy="{target - level}" font-size="{small}">{esc(p[2:-1])}</tspan>')
            level = target
        else:
            dy = f' dy="{-level}"' if level else ""
            body.append(f"<tspan{dy}>{esc(p)}</tspan>")
            level = 0
    style = ' font-style="italic"' if italic else ""
    rot = f' transform="rotate({rotate} {x} {y})"' if rotate is not None else ""
    out.append(f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
               f'fill="{fill}"{style}{rot}>{"".join(body)}</text>')


def rect(x, y, w, h, fill="none", stroke="none", sw=1, extra=""):
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}" stroke="{stroke}" '
               f'stroke-width="{sw}"{extra}/>')


def line(x1, y1, x2, y2, stroke="#222", sw=1, extra=""):
    out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{stroke}" stroke-width="{sw}"{extra}/>')


def arrow(x1, y1, x2, y2, stroke="#222", sw=1.5):
    line(x1, y1, x2, y2, stroke, sw, ' marker-end="url(#arrow)"')


def diag_color(k, n, light):
    """Colour of diagonal k of n (hue sweep); light = fill of the tile cells, else the kappa cell."""
    hue = 210 - 190 * k / (n - 1)
    return f"hsl({hue:.0f}, 70%, {88 if light else 62}%)"


# ---- header and definitions
out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="{FONT}" xml:space="preserve">')
out.append('<defs>'
           '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#222"/></marker>'
           '<pattern id="hatch" width="7" height="7" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
           '<rect width="7" height="7" fill="#eeeeee"/><line x1="0" y1="0" x2="0" y2="7" stroke="#c4c4c4" '
           'stroke-width="2"/></pattern>'
           '</defs>')
rect(0, 0, W, H, fill="white")
text(W / 2, 26, "The tiled GOAT forward (v2, v3): one query tile Q_{i} against the key tiles K_{j}, V_{j}",
     size=15, anchor="middle", weight="bold")

# ---- left: the score matrix. 4 query tiles of B_r = 80 px, 8 key tiles of B_c = 40 px (B_r = 2 B_c as in v3)
MX, MY, M = 80, 92, 320
BR, BC = 80, 40
QI = 2                       # the query tile shown (rows MY + 160 .. MY + 240)
JCUR = 2                     # the key tile being processed
qy0, qy1 = MY + QI * BR, MY + (QI + 1) * BR
n_visit = (QI + 1) * BR // BC  # key tiles up to the diagonal: 6

text(MX + M / 2, MY - 44, "keys j →", size=13, anchor="middle")
text(MX - 52, MY + 6, "queries i →", size=13, anchor="start", rotate=90)
# u along the top, one entry per key
rect(MX, MY - 18, M, 12, fill="#fff3e0", stroke="#b0b0b0")
rect(MX + JCUR * BC, MY - 18, BC, 12, fill="#f39c12", stroke="#a05a00", sw=1.5)
text(MX - 6, MY - 8, "u", size=13, anchor="end", italic=True)
# matrix background, visited tiles of the query tile, causal mask
rect(MX, MY, M, M, fill="#fafafa", stroke="#555", sw=1.2)
for t in range(n_visit):
    rect(MX + t * BC, qy0, BC, BR, fill="#d6e6f7", stroke="#5b8bc0", sw=1)
out.append(f'<polygon points="{MX},{MY} {MX + M},{MY} {MX + M},{MY + M}" fill="url(#hatch)" stroke="none"/>')
# tile grid
for t in range(1, M // BC):
    line(MX + t * BC, MY, MX + t * BC, MY + M, "#c8c8c8", 0.8)
for t in range(1, M // BR):
    line(MX, MY + t * BR, MX + M, MY + t * BR, "#c8c8c8", 0.8)
rect(MX, qy0, n_visit * BC, BR, stroke="#1f5fa8", sw=2)
rect(MX, MY, M, M, stroke="#555", sw=1.2)
line(MX, MY, MX + M, MY + M, "#555", 1.2, ' stroke-dasharray="5,3"')
text(MX + M - 8, MY + 40, "masked: j > i", size=12, anchor="end", fill="#555")
text(MX + M - 8, MY + 56, "(causal)", size=12, anchor="end", fill="#555")
# the current tile
rect(MX + JCUR * BC, qy0, BC, BR, fill="#2e75c9", stroke="#0d3d78", sw=2)
text(MX + JCUR * BC + BC / 2, qy0 + BR / 2 + 5, "S", size=14, anchor="middle", fill="white", weight="bold")
# tiles past the diagonal are skipped
text(MX + n_visit * BC + BC, qy0 + BR / 2 + 4, "skipped", size=11, anchor="middle", fill="#555")
# labels: Q_i with B_r brace on the left, B_c over the current tile, the streaming arrow
line(MX - 8, qy0 + 1, MX - 8, qy1 - 1, "#1f5fa8", 2)
line(MX - 12, qy0 + 1, MX - 4, qy0 + 1, "#1f5fa8", 2)
line(MX - 12, qy1 - 1, MX - 4, qy1 - 1, "#1f5fa8", 2)
text(MX - 16, qy0 + BR / 2 - 2, "Q_{i}", size=13, anchor="end", weight="bold", fill="#1f5fa8")
text(MX - 16, qy0 + BR / 2 + 14, "B_{r} rows", size=11, anchor="end", fill="#1f5fa8")
arrow(MX + 4, qy1 + 14, MX + n_visit * BC - 4, qy1 + 14, "#1f5fa8", 2)
text(MX + n_visit * BC / 2, qy1 + 30, "K_{j}, V_{j} (B_{c} keys each) stream left to right,", size=11,
     anchor="middle", fill="#1f5fa8")
text(MX + n_visit * BC / 2, qy1 + 44, "up to the diagonal", size=11, anchor="middle", fill="#1f5fa8")
text(MX + JCUR * BC + BC / 2, MY - 25, "K_{j}", size=12, anchor="middle", weight="bold", fill="#a05a00")

# ---- right: the tile pair enlarged (schematic B_r = 8, B_c = 4)
ZR, ZC, CELL = 8, 4, 22
ZX, ZY = 536, 124
ND = ZR + ZC - 1
# connector from the current tile to the enlargement
cx = MX + JCUR * BC + BC
line(cx, qy0, ZX - CELL, ZY - CELL, "#8aa9cf", 1, ' stroke-dasharray="4,3"')
line(cx, qy1, ZX - CELL, ZY + ZR * CELL, "#8aa9cf", 1, ' stroke-dasharray="4,3"')
for r in range(ZR):
    for c in range(ZC):
        k = r - c + ZC - 1  # diagonal index 0 .. ND-1 (r - c from -(B_c - 1) to B_r - 1)
        rect(ZX + c * CELL, ZY + r * CELL, CELL, CELL, fill=diag_color(k, ND, True), stroke="#9a9a9a", sw=0.6)
# the kappa slice: one cell per diagonal, where the diagonal leaves the tile at the top or the left
kcells = []
for c in range(-1, ZC - 1):        # above the tile (and the corner): r - c = -(c + 1) = 0 .. -(B_c - 1)
    kcells.append((ZX + c * CELL, ZY - CELL, -(c + 1)))
for r in range(0, ZR - 1):         # left of the tile: r - c = r + 1 = 1 .. B_r - 1
    kcells.append((ZX - CELL, ZY + r * CELL, r + 1))
for x, y, d in kcells:             # each diagonal through the tile, in its entry's colour
    k = d + ZC - 1
    r_first, c_first = (d, 0) if d >= 0 else (0, -d)
    n = min(ZR - r_first, ZC - c_first)
    x1, y1 = ZX + (c_first + n - 0.5) * CELL, ZY + (r_first + n - 0.5) * CELL
    line(x + CELL / 2, y + CELL / 2, x1, y1, diag_color(k, ND, False), 2)
for x, y, d in kcells:
    k = d + ZC - 1
    rect(x, y, CELL, CELL, fill=diag_color(k, ND, False), stroke="#444", sw=0.8)
    text(x + CELL / 2, y + CELL / 2 + 4, str(d).replace("-", "−"), size=10, anchor="middle")
rect(ZX, ZY, ZC * CELL, ZR * CELL, stroke="#0d3d78", sw=2)
# u slice: one cell per key column, under the tile
uy = ZY + ZR * CELL + 10
for c in range(ZC):
    rect(ZX + c * CELL, uy, CELL, CELL, fill="#f39c12", stroke="#444", sw=0.8)
    text(ZX + c * CELL + CELL / 2, uy + CELL / 2 + 4, f"u_{{{c}}}", size=10, anchor="middle")
# labels of the enlargement
text(ZX + ZC * CELL / 2 - CELL / 2, ZY - CELL - 12, "one tile pair (Q_{i}, K_{j}), enlarged", size=12,
     anchor="middle", weight="bold")
TX = ZX + ZC * CELL + 16
text(TX, ZY + 12, "S, z: B_{r} × B_{c} (drawn 8 × 4)", size=12)
text(TX, ZY + 42, "κ slice", size=13, weight="bold", fill="#7a3b9a")
for t, s_ in enumerate(["B_{r} + B_{c} − 1 entries (11 here),",
                        "one per diagonal i − j. Follow",
                        "a diagonal up and to the left,",
                        "out of the tile, to its entry",
                        "(number: row − column",
                        "inside the tile)"]):
    text(TX, ZY + 60 + 15 * t, s_, size=11.5)
text(TX, uy + 8, "u slice", size=13, weight="bold", fill="#a05a00")
text(TX, uy + 25, "B_{c} entries, one per", size=11.5)
text(TX, uy + 40, "key column", size=11.5)

# ---- bottom: one step of the loop
BY, BH, BW, GAP = 488, 92, 182, 18
BX0 = (W - (4 * BW + 3 * GAP)) / 2
boxes = [
    ("1. scores", ["S = scale · Q_{i} K_{j}^{T}", "B_{r} × B_{c}, fp32 accumulate", "(v3: bf16 mma.sync)"],
     "#e8f0fa", "#5b8bc0"),
    ("2. the GOAT step", ["z = S + κ[i − j] + u[j]", "z = −∞ where masked", "(j > i causal, j ≥ L)"],
     "#fdebd0", "#c0772a"),
    ("3. online softmax", ["m' = max(m, rowmax z)", "P = exp(z − m')", "l = e^{m − m'} l + rowsum P"],
     "#e8f0fa", "#5b8bc0"),
    ("4. accumulate", ["O_{i} = e^{m − m'} O_{i} + P V_{j}", "m = m'", "(v3: P rounded to bf16)"],
     "#e8f0fa", "#5b8bc0"),
]
text(W / 2, BY - 16, "for each key tile K_{j}, V_{j} up to the diagonal (Q_{i}, O_{i}, m, l stay on chip):",
     size=12, anchor="middle", weight="bold")
for n, (title, lines, fill, stroke) in enumerate(boxes):
    x = BX0 + n * (BW + GAP)
    rect(x, BY, BW, BH, fill=fill, stroke=stroke, sw=1.5, extra=' rx="6"')
    text(x + BW / 2, BY + 20, title, size=12, anchor="middle", weight="bold")
    for t, s in enumerate(lines):
        text(x + BW / 2, BY + 42 + 17 * t, s, size=11.5, anchor="middle")
    if n < 3:
        arrow(x + BW + 2, BY + BH / 2, x + BW + GAP - 2, BY + BH / 2)
# loop back from 4 to 1
lx0, lx1, ly = BX0 + 3 * (BW + GAP) + BW / 2, BX0 + BW / 2, BY + BH + 16
out.append(f'<path d="M{lx0},{BY + BH} L{lx0},{ly} L{lx1},{ly} L{lx1},{BY + BH + 2}" fill="none" stroke="#222" '
           f'stroke-width="1.5" marker-end="url(#arrow)"/>')
text((lx0 + lx1) / 2, ly - 4, "next K_{j}, V_{j}", size=11, anchor="middle")
text(W / 2, ly + 22, "after the last tile: o_{i} = O_{i} / l,  lse_{i} = m + log l   "
     "(a row with nothing allowed: o_{i} = 0, lse_{i} = −∞)", size=12, anchor="middle")
text(W / 2, ly + 40, "Tiles: v2 B_{r} = 32, B_{c} = 64 (fp32);  v3 B_{r} = 128, B_{c} = 64 (bf16).", size=11.5,
     anchor="middle", fill="#555")
text(W / 2, ly + 56, "No L × L matrix and no sin/cos: the prior costs one shared-memory read and one add per score.",
     size=11.5, anchor="middle", fill="#555")
out.append("</svg>")

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiled_forward.svg")
with open(path, "w") as f:
    f.write("\n".join(out) + "\n")
print("wrote", path)
