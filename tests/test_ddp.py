"""Map heads trained across processes (`torchrun ... -m imet fit`): two gloo ranks on the CPU give the
single process's model, only rank 0 writes it, a rank that raises or is killed leaves --out as it was.

Tolerance: without dropout, the weights and val probabilities of 2 epochs agree within 1e-5 (measured:
3e-8 csra, 3e-6 mldecoder, 2e-8 attn_rnn; the rest is the order of float sums in the gradient all-reduce).
The store has 101 train views: csra's batches of 7 split 4/3 over the ranks (each share's loss must be
weighted by its size), the others' batches of 10 end with one of 1 view that leaves rank 1 a padding view
of weight 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from imet.cli import cli
from imet.heads import load_model, make_head
from imet.heads.ddp import Ranks
from imet.planted import write_planted_store
from imet.store import FeatureStore

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
COMMON = {"epochs": 2, "batch_size": 10, "workers": 0}
HEADS = {  # no dropout: the ranks' dropout masks are their own
    "csra": {"patience": 1, "batch_size": 7},  # val scored on rank 0 and broadcast every epoch
    "mldecoder": {"decoder_dropout": 0.0, "width": 16, "heads": 2, "groups": 5},
    "attn_rnn": {"dropout": 0.0, "hidden": 16, "attention_dim": 16, "pred_dim": 16, "patience": 0},
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "store.h5"
    write_planted_store(path, n_images=80, channels=16, grid=4, hog=16, views=(1, 3))
    return path


def fit_args(store: Path, head: str, out: Path, params: dict) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    return ["fit", "--store", str(store), "--head", head, "--out", str(out), *flags]


@pytest.mark.parametrize("head", HEADS)
def test_two_ranks_equal_one_process(planted, head, tmp_path):
    params = {**COMMON, **HEADS[head]}
    store = FeatureStore(planted)
    assert len(store.views("train")) == 101
    one = make_head(head, **params).fit(store)
    out = tmp_path / "model.pt"
    result = subprocess.run([*TORCHRUN, "-m", "imet", *fit_args(planted, head, out, params)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 1 and "on 2 processes" in result.stdout  # rank 0 alone reports
    two = load_model(out)
    a, b = one._module().state_dict(), two._module().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    val = store.views("val")
    np.testing.assert_allclose(two.predict_proba(store, val), one.predict_proba(store, val), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("fail", ["raise", "kill"])
def test_a_failing_rank_writes_nothing(planted, fail, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the model of an earlier fit")
    env = {**ENV, "IMET_FAIL": fail, "IMET_FAIL_RANK": "1"}
    script = Path(__file__).with_name("ddp_fault.py")
    result = subprocess.run([*TORCHRUN, str(script), *fit_args(planted, "csra", out, COMMON)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [x for x in result.stderr.splitlines() if x.startswith("Error: rank ")]
    assert all("no model written" in x for x in lines), result.stderr
    first = {"raise": "Error: rank 1 of 2: training stopped (RuntimeError: planted failure)",
             "kill": "Error: rank 0 of 2: "}[fail]  # a killed rank says nothing; the survivor does
    assert any(x.startswith(first) for x in lines), result.stderr
    assert out.read_bytes() == b"the model of an earlier fit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left


TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--head", "linear"], {}, "head linear trains in one process"),
    (["--head", "lgbm"], {}, "head lgbm trains in one process"),
    (["--head", "csra", "--folds", "2"], {}, "--folds and --oof fit in one process"),
    (["--head", "csra"], {"IMET_DIST_TIMEOUT": "soon"}, "IMET_DIST_TIMEOUT='soon': give the longest wait"),
])
def test_what_torchrun_does_not_train_is_refused(planted, tmp_path, args, env, message):
    """Refused before joining the ranks (MASTER_PORT 1 is never reached)."""
    result = CliRunner().invoke(cli, ["fit", "--store", str(planted), "--out", str(tmp_path / "m.pt"), *args],
                                env={**TORCHRUN_ENV, **env})
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "m.pt").exists()


def test_a_rank_refused_by_the_real_entry_point_exits_2(planted, tmp_path):
    """`python -m imet` under torchrun's environment ends its rank with os._exit (imet.cli.main), keeping the code."""
    result = subprocess.run([sys.executable, "-m", "imet", "fit", "--store", str(planted), "--head", "csra",
                             "--folds", "2", "--out", str(tmp_path / "m.pt")], env={**ENV, **TORCHRUN_ENV},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--folds and --oof fit in one process" in result.stderr, result.stderr
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_make_the_global_mean(world):
    """Every view of a global batch in exactly one share; the shares' weighted means give the batch mean."""
    rng = np.random.default_rng(world)
    for n in range(1, 13):
        batch, loss = np.arange(n) * 3, rng.normal(size=n)
        ranks = [Ranks(r, world) for r in range(world)]
        counted = np.concatenate([x.share(batch)[:x.count(n)] for x in ranks])
        np.testing.assert_array_equal(counted, batch)
        assert all(len(x.share(batch)) == max(x.count(n), 1) for x in ranks)  # never empty: padding
        means = [loss[np.isin(batch, x.share(batch))].mean() for x in ranks]
        average = sum(x.weight(n) * m for x, m in zip(ranks, means, strict=True)) / world  # what DDP takes
        assert average == pytest.approx(loss.mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_none_computes_in_float32_on_cuda(planted):
    """--amp none on CUDA gives the CPU's float32 probabilities; bf16 autocast (the default) is near them."""
    store = FeatureStore(planted)
    head = make_head("csra", **COMMON, device="cpu").fit(store)
    val = store.views("val")
    cpu = head.predict_proba(store, val)
    head.set_params(device="cuda", amp="none")
    np.testing.assert_allclose(head.predict_proba(store, val), cpu, rtol=0, atol=1e-4)
    head.set_params(amp="bf16")
    bf16 = head.predict_proba(store, val)
    assert 0 < np.abs(bf16 - cpu).max() < 0.05
