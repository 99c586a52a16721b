"""tools/what_fits: the BENCHMARKS.md table of what `--dtype auto` picks per machine, computed
from the precision policy on the released shapes."""

from mlx_starflow.tools import what_fits


def test_what_fits_table():
    lines = what_fits.table()
    rows = lines[2:]
    assert len(rows) == 2 * len(what_fits.MACHINES)
    shapes = what_fits.shapes_3b()
    cpu24 = what_fits.row(shapes, 24, gpu=False)
    assert cpu24["choice"] == "flow float32, text encoder float32" and cpu24["fits"]
    gpu8 = what_fits.row(shapes, 8, gpu=True)
    assert gpu8["choice"] == "flow 4-bit, text encoder 8-bit" and gpu8["one_shot_peak"] < 3.5e9
    for gb in (16, 24, 36, 64):
        assert what_fits.row(shapes, gb, gpu=True)["choice"] == "flow bfloat16, text encoder bfloat16"
    # one-shot never above resident
    assert all(
        what_fits.row(shapes, gb, g)["one_shot_peak"] <= what_fits.row(shapes, gb, g)["resident_peak"]
        for gb in what_fits.MACHINES
        for g in (True, False)
    )
