"""Does a toy model use the relation word? Same object pairs, all four relations, same noise.

For each of --pairs training-split position prompts, the prompt is rendered with every relation
("to the left of", "to the right of", "above", "below") at the same seeds. Where both objects are
found, it counts how often the first lies left / right / above / below the second (centroids 4 px
apart, the scorer's rule). A model that ignores the relation gives the same shares in every row;
a perfect one gives 1.0 on the diagonal. It also scores bare-relation prompts ("a red circle to the
left", see `bitflux toy train --absolute-positions`): is the object at the named edge? Prints a
table and writes JSON.

    python research/toy_relations.py toy --out bench/results/toy-relations.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from bitflux.eval.runner import EvalConfig, PromptItem, generate, load_model
from bitflux.toy.scorer import REL_MARGIN, _matches, detect
from bitflux.toy.world import CELL, Category, Relation, Split, caption_spec, parse_prompt, sample_spec

COLUMNS = ("left", "right", "above", "below")


def relation_table(pipe, pairs: int = 24, seeds: int = 2, seed: int = 5) -> dict:
    """{relation: {"n": found pairs, "left": share, "right": ..., "above": ..., "below": ...}}."""
    rng = random.Random(seed)
    specs = [sample_spec(rng, Category.POSITION, Split.TRAIN) for _ in range(pairs)]
    items = [PromptItem(caption_spec(dataclasses.replace(s, relation=r)), Category.POSITION) for s in specs for r in Relation]
    images = generate(pipe, items, seeds, EvalConfig())  # (seeds, n, H, W, 3)
    offsets: dict[str, list[tuple[float, float]]] = {r.name.lower(): [] for r in Relation}
    for row in images:
        for img, it in zip(row, items):
            spec = parse_prompt(it.text)
            dets = detect(img)
            a, b = ([d for d in dets if _matches(d, o.shape, o.color)] for o in spec.objects)
            if a and b:
                offsets[spec.relation.name.lower()].append((a[0].x - b[0].x, a[0].y - b[0].y))
    out = {}
    for rel, v in offsets.items():
        d = np.array(v, dtype=np.float64).reshape(-1, 2)
        shares = [d[:, 0] < -REL_MARGIN, d[:, 0] > REL_MARGIN, d[:, 1] < -REL_MARGIN, d[:, 1] > REL_MARGIN]
        out[rel] = {"n": len(v), **{c: round(float(s.mean()), 3) if len(v) else None for c, s in zip(COLUMNS, shares)}}
    hits = [out[r][r] for r in COLUMNS if out[r]["n"]]
    out["diagonal_mean"] = round(float(np.mean(hits)), 3) if hits else None
    return out


def edge_table(pipe, n: int = 48, seeds: int = 2, seed: int = 9) -> dict:
    """Bare-relation prompts ("a red circle to the left", as `--absolute-positions` trains): the
    share of images whose object lies in the named edge row/column (1/3 by chance)."""
    from bitflux.toy.data import absolute_scene, at_edge, bare_relation

    rng = random.Random(seed)
    texts = [absolute_scene(rng)[1] for _ in range(n)]
    images = generate(pipe, [PromptItem(t, Category.COLORS) for t in texts], seeds, EvalConfig())
    hits: dict[str, list[bool]] = {c: [] for c in COLUMNS}
    for row in images:
        for img, text in zip(row, texts):
            dets = detect(img)
            if not dets:
                continue
            rel = next(r for r in Relation if text.endswith(bare_relation(r)))
            cell = (int(dets[0].y // CELL), int(dets[0].x // CELL))  # (row, col)
            hits[rel.name.lower()].append(at_edge(rel, cell))
    out = {c: round(float(np.mean(v)), 3) if v else None for c, v in hits.items()}
    out["mean"] = round(float(np.mean([x for v in hits.values() for x in v])), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="toy | toy-1.58bit | pipeline dir | quantised transformer dir")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model)
    table = relation_table(pipe, args.pairs, args.seeds)
    print(f"{'prompt says':<12} {'n':>4} " + " ".join(f"{c:>6}" for c in COLUMNS))
    for rel in COLUMNS:
        r = table[rel]
        print(f"{rel:<12} {r['n']:>4} " + " ".join(f"{r[c]:>6.2f}" if r[c] is not None else "     -" for c in COLUMNS))
    print(f"diagonal mean {table['diagonal_mean']} (random placement in distinct cells: 0.375)")
    edges = edge_table(pipe, seeds=args.seeds)
    print("bare relation ('a red circle to the left'): object at the named edge " +
          " ".join(f"{c} {edges[c]}" for c in COLUMNS) + f"; mean {edges['mean']} (chance 0.333)")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"model": args.model, "pairs": args.pairs, "seeds": args.seeds, **table, "bare_relation_edge": edges}, indent=2))
        tmp.replace(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
