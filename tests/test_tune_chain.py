"""dev/tune_chain.py (a GPU script) imports and reads its arguments on a machine without a GPU."""
import pytest

from tests.script_module import load


def test_arguments_and_configurations():
    mod = load("tune_chain")
    args = mod.parse_args(["--C", "4096,7168", "--T", "1024", "--bwd", "b2_br=32;"])
    assert args.widths == [4096, 7168] and args.T == 1024 and args.L == 4
    assert mod.parse_cfgs(args.bwd) == [{"b2_br": 32}, {}]
    assert mod.parse_cfgs("precision=ieee,bt=64") == [{"precision": "ieee", "bt": 64}]
    assert mod.parse_args(["--dry"]).widths == [64]
    with pytest.raises(SystemExit, match="unknown config field 'split'"):
        mod.parse_cfgs("split=2")


def test_tilelang_configurations():
    """--backend tilelang reads the fields of TileLang's boundary Config (and has no --dry)."""
    pytest.importorskip("tilelang")
    mod = load("tune_chain")
    assert mod.parse_args(["--backend", "tilelang"]).backend == "tilelang"
    assert mod.parse_cfgs("cw=256,bt=64;", "tilelang") == [{"cw": 256, "bt": 64}, {}]
    with pytest.raises(SystemExit, match="unknown config field 'b2_br'"):
        mod.parse_cfgs("b2_br=32", "tilelang")
    with pytest.raises(SystemExit):
        mod.parse_args(["--backend", "tilelang", "--dry"])
