"""Folds copies of a run folder, resumed in separate device calls, back into the committed one:

    python dev/merge_records.py results/<run> /work/.device/12 /work/.device/13 ...

Each copy is a folder with records.jsonl (and optionally scenarios/), as dev/gpu_resume.sh
leaves in $OUT. Then `python harness.py report results/<run>` rebuilds report.md."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from suite.store import merge_run_copies  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("copies", type=Path, nargs="+")
    args = ap.parse_args()
    for p in [args.run_dir, *args.copies]:
        if not (p / "records.jsonl").exists():
            print(f"merge_records: {p}: no records.jsonl", file=sys.stderr)
            return 2
    added, replaced = merge_run_copies(args.run_dir, args.copies)
    print(f"{args.run_dir}: {added} records added, {replaced} replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
