"""Every declared parameter constraint at its edges, generated from the declarations (imet.params): the value
just inside is taken, the value just outside is refused naming the parameter. Head parameters through
`make_head` (and `validate` with the store's label count, for the bounds the labels set) and through
`imet fit --PARAM value` on a tiny store, stopped once the parameters are validated (no head is fitted);
featurize settings through `Options` and `imet featurize --dry-run --PARAM value`; decoding (blend fit's and
stack's) through `Decoding.check` (its command lines need probability files; the same declarations reach
`imet fit` as head parameters, tested there).

Not covered: `Text` parameters (a file name, a parsed list: no edge to step across; test_api checks their
refusal) and refusing a non-bool through the CLI (a bool is a --flag/--no-flag there)."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from helpers import make_store

from imet.cli import cli
from imet.decode.spec import PARAMS as DECODING
from imet.decode.spec import Decoding
from imet.featurize.options import HogParams, Options, get_spec
from imet.heads import HEADS, Head, ParamError, make_head
from imet.params import FLOAT32_MAX, Bool, Bound, Choice, Float, Int
from imet.runtime import max_workers

N_LABELS = 6  # the test store's labels: the value of the LABELS bounds
BOUNDS = {"labels": N_LABELS, "workers": max_workers(), "channels": get_spec(Options.backbone).channels,
          "hog_length": HogParams().length(Options.image_size)}  # featurize's defaults: its backbone, HOG at 224 px
# other parameters a value needs to be taken with: mldecoder's heads divide its width, and starting from csra
# needs min(groups, labels) <= width
COMPANIONS = {("mldecoder", "width"): {"heads": 1, "groups": 1}}
# featurize: the smallest views hold no HOG block (Options, then the command line)
FEATURIZE_COMPANIONS = {"image_size": ({"hog": None}, ["--no-hog"])}


def edges(spec) -> list[tuple[object, bool]]:
    """(value, taken) pairs on each side of each edge of one constraint."""
    check, out = spec.check, []
    if isinstance(check, Int):
        if check.low is not None:
            out += [(check.low, True), (check.low - 1, False)]
        high = check.high
        if isinstance(high, Bound):
            high = BOUNDS[high.name]
        if high is not None:
            out += [(high, True), (high + 1, False)]
    elif isinstance(check, Float):
        if check.low is not None:
            below, above = math.nextafter(check.low, -math.inf), math.nextafter(check.low, math.inf)
            out += [(check.low, False), (above, True)] if check.low_open else [(check.low, True), (below, False)]
        if check.high is None:  # at most float32's largest
            out += [(FLOAT32_MAX, True), (math.nextafter(FLOAT32_MAX, math.inf), False)]
        else:
            below, above = math.nextafter(check.high, -math.inf), math.nextafter(check.high, math.inf)
            out += [(check.high, False), (below, True)] if check.high_open else [(check.high, True), (above, False)]
    elif isinstance(check, Choice):
        out += [(v, True) for v in check.values] + [(check.values[0].upper(), False)]
    elif isinstance(check, Bool):
        out += [(True, True), (False, True), (1, False)]
    if out:
        out.append((None, spec.none is not None))  # None only where the declaration says what it means
    return out


def other_heads_choices(name: str, param: str) -> list[str]:
    """Values that other heads take for a Choice parameter of the same name and head `name` does not."""
    own = HEADS[name].param_specs()[param].check.values
    return sorted({v for cls in HEADS.values() for p, s in cls.param_specs().items()
                   if p == param and isinstance(s.check, Choice) for v in s.check.values} - set(own))


def case(owner: str, param: str, value, taken: bool):
    no_cuda = pytest.mark.skipif(value == "cuda" and not torch.cuda.is_available(), reason="no CUDA")
    return pytest.param(owner, param, value, taken, id=f"{owner}-{param}-{value!r}-{'in' if taken else 'out'}",
                        marks=[no_cuda])


def on_the_cli(pairs: list, spec) -> list:
    """The pairs a command line can give: not None (an option left out), not a bool (a --flag/--no-flag)."""
    return [] if isinstance(spec.check, Bool) else [(v, ok) for v, ok in pairs if v is not None]


def featurize_cases(cli_only: bool = False) -> list:
    return [case("featurize", param, value, ok) for param, spec in Options.params.items()
            for value, ok in (on_the_cli(edges(spec), spec) if cli_only else edges(spec))]


def decoding_cases() -> list:
    return [case("blend", param, value, ok) for param, spec in DECODING.items() for value, ok in edges(spec)]


def head_cases(cli_only: bool = False) -> list:
    seen, out = set(), []
    for name in sorted(HEADS):
        for param, spec in HEADS[name].param_specs().items():
            pairs = edges(spec)
            if isinstance(spec.check, Choice):
                pairs += [(v, False) for v in other_heads_choices(name, param)]
            if cli_only:  # one fit option per parameter name: each distinct declaration of it once
                if (param, spec.check) in seen:
                    continue
                seen.add((param, spec.check))
                pairs = on_the_cli(pairs, spec)
            out += [case(name, param, value, ok) for value, ok in pairs]
    return out


@pytest.mark.parametrize(("name", "param", "value", "taken"), head_cases())
def test_make_head_takes_the_value_just_inside_and_refuses_the_one_outside(name, param, value, taken):
    params = {**COMPANIONS.get((name, param), {}), param: value}
    if taken:
        make_head(name, **params).validate(N_LABELS)
        return
    with pytest.raises(ParamError, match=rf"^{name}: {param} must be ") as caught:
        make_head(name, **params).validate(N_LABELS)  # a bound from the labels: refused once they are known
    assert caught.value.names == (param,)


class Validated(Exception):
    """Raised where fit would first look at the store: every parameter has been checked by then."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bounds") / "s.h5", n_images=20, n_labels=N_LABELS)


@pytest.mark.parametrize(("name", "param", "value", "taken"), head_cases(cli_only=True))
def test_fit_option_takes_the_value_just_inside_and_refuses_the_one_outside(name, param, value, taken, store,
                                                                            tmp_path, monkeypatch):
    def stop(self, store, fitted=True):
        raise Validated

    monkeypatch.setattr(Head, "check_store", stop)
    flag = "--" + param.replace("_", "-")
    args = [a for k, v in COMPANIONS.get((name, param), {}).items() for a in ("--" + k.replace("_", "-"), str(v))]
    result = CliRunner().invoke(cli, ["fit", "--store", str(store), "--head", name, "--out", str(tmp_path / "m.pt"),
                                      *args, flag, repr(value) if isinstance(value, float) else str(value)])
    if taken:
        assert isinstance(result.exception, Validated), result.output
        return
    refused_naming(result, flag)
    assert not (tmp_path / "m.pt").exists()


def refused_naming(result, flag: str) -> None:
    """Exit 2, no traceback, one error line and it names the option."""
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and flag in errors[0], result.output


@pytest.mark.parametrize(("owner", "param", "value", "taken"), featurize_cases())
def test_featurize_options_take_the_value_just_inside_and_refuse_the_one_outside(owner, param, value, taken):
    options = {**FEATURIZE_COMPANIONS.get(param, ({}, []))[0], param: value}
    if taken:
        Options(**options)
        return
    with pytest.raises(ParamError, match=rf"^{owner}: {param} must be ") as caught:
        Options(**options)
    assert caught.value.names == (param,)


@pytest.mark.parametrize(("owner", "param", "value", "taken"), featurize_cases(cli_only=True))
def test_featurize_option_takes_the_value_just_inside_and_refuses_the_one_outside(owner, param, value, taken,
                                                                                  data_dir, tmp_path):
    flag = "--" + param.replace("_", "-")
    result = CliRunner().invoke(cli, ["featurize", str(data_dir), "--out", str(tmp_path / "s.h5"), "--dry-run",
                                      *FEATURIZE_COMPANIONS.get(param, ({}, []))[1], flag, str(value)])
    if taken:
        assert result.exit_code == 0 and "views of" in result.output, result.output
    else:
        refused_naming(result, flag)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize(("owner", "param", "value", "taken"), decoding_cases())
def test_decoding_takes_the_value_just_inside_and_refuses_the_one_outside(owner, param, value, taken):
    decoding = Decoding(**{param: value})
    if taken:
        decoding.check(owner, N_LABELS)
        return
    with pytest.raises(ParamError, match=rf"^{owner}: {param} must be ") as caught:
        decoding.check(owner, N_LABELS)
    assert caught.value.names == (param,)
