"""The examples a new user runs first, at toy sizes: they run, print what they promise, and resume exactly."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prints_the_four_runs_and_the_report(capsys):
    pytest.importorskip("tqdm")
    _load("quickstart").main(["--steps", "3", "--batch", "2", "--seq", "16", "--dim", "32", "--budget", "0.5"])
    out = capsys.readouterr().out
    for row in ("torch.compile", "velora_fx ", "velora_fx, 2-bit", "velora_fx, budget 0.5"):
        assert row in out, out
    assert "sites compressed" in out and "kept for backward per step, all graphs" in out
    assert max(len(line) for line in out.splitlines()) <= 100  # a 100-column terminal


def test_pretrain_example_resumes_bit_identically(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tqdm")
    pretrain = _load("pretrain_llama")
    common = ["--steps", "4", "--batch", "2", "--seq", "16", "--dim", "32", "--layers", "1", "--heads", "2",
              "--eval-every", "2", "--eval-batches", "1", "--quiet", "--route", "velora",
              "--config", json.dumps({"estimator": "principal_random", "rank": 8, "refresh_every": 3})]  # fmt: skip
    whole = pretrain.main([*common, "--log", str(tmp_path / "whole.jsonl")])
    ckpt = tmp_path / "ckpt.pt"
    pretrain.main([*common, "--stop-after", "2", "--ckpt", str(ckpt), "--log", str(tmp_path / "a.jsonl")])
    resumed = pretrain.main([*common, "--ckpt", str(ckpt), "--resume", "--log", str(tmp_path / "b.jsonl")])
    assert whole["val_loss"] == resumed["val_loss"]  # across a refresh (step 3): bit-identical
    first = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert first[-1]["step"] == 2, first
