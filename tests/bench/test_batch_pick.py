"""``bench/batch_pick.py``: real server starts on a small real model folder, each start's choice
of batch size read from its ``/v1/models`` over loopback HTTP."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
batch_pick = importlib.import_module("bench.batch_pick")
serve = importlib.import_module("bench.serve")


def test_each_start_records_the_size_it_chose_from_its_own_timings(tmp_path, capsys):
    from server.batcher import efficient_batch

    model = serve.random_model_folder(tmp_path, input_px=64)
    out = tmp_path / "batch_pick.json"
    argv = ["--model", model, "--starts", "2", "--max-batch-size", "4", "--out", str(out)]
    assert batch_pick.main(argv) == 0
    record = json.loads(out.read_text())
    assert len(record["starts"]) == 2 and record["machine"]["load_average_after"]
    for start in record["starts"]:
        timings = {int(n): ms for n, ms in start["ms_per_image"].items()}
        assert sorted(timings) == [1, 2, 4] and all(ms > 0 for ms in timings.values())
        assert start["backend"] == "torch"
        assert start["batch_size"] == efficient_batch(timings)
    printed = capsys.readouterr().out
    assert "| start | 1 | 2 | 4 | cheapest | chosen |" in printed and "chosen: {" in printed
