"""Write a copy of a wildcheck ONNX model whose contract declares another tiling (same weights, same thresholds).

    python benchmarks/set_tiling.py models/wildcheck-ivory.onnx /tmp/wildcheck-ivory-panels.onnx --mode panels
    python benchmarks/set_tiling.py MODEL.onnx OUT.onnx --mode none
    python benchmarks/set_tiling.py MODEL.onnx OUT.onnx --mode panels --panels-only --collage-rate 2

For measuring inference modes on the same weights (``wildcheck evaluate`` / ``robustness`` read the tiling
from the contract). The thresholds stay those the model was calibrated with; the contract hash changes (a
gallery built for the source model is refused by the copy: rebuild it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serving.contract import contract_hash, read_contract
from serving.tiling import Tiling
from training.export import write_contract


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", choices=["panels", "grid", "none"], default="panels")
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--min-tile-side", type=int, default=64)
    ap.add_argument("--panels-only", action="store_true", help="a found collage is scored by its panels, not the composite")
    ap.add_argument("--collage-rate", type=float, default=None, help="Tiling.collage_rate (panels mode)")
    args = ap.parse_args()
    if args.out.resolve() == args.model.resolve():
        raise SystemExit("write the copy to another path: the source model is left as it is")
    contract = read_contract(args.model)
    tiling = None if args.mode == "none" else Tiling(
        mode=args.mode, grid=args.grid, min_tile_side=args.min_tile_side,
        **({"whole_with_panels": not args.panels_only, "collage_rate": args.collage_rate} if args.mode == "panels" else {}))
    new = contract.model_copy(update={"tiling": tiling})
    write_contract(args.model, args.out, new)
    print(f"wrote {args.out}: tiling {tiling.model_dump() if tiling else None}; "
          f"contract hash {contract_hash(contract)[:12]} -> {contract_hash(read_contract(args.out))[:12]}")


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
