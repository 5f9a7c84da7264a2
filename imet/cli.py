"""The `imet` command: a thin click layer. Each command parses, calls one library function, reports."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import click

import imet
from imet import config
from imet.decode.spec import BLEND_MIN_POSITIVES, BLEND_WEIGHTINGS, ENSEMBLE, Decoding
from imet.decode.spec import PARAMS as DECODING
from imet.errors import ImetError, ParamError, one_line
from imet.files import atomic_paths, check_paths

SEED = click.IntRange(0, 2**32 - 1)  # every seed option: numpy's and torch's range in common


class _UserError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns ImetError (bad input, refused operation) into a one-line message and its exit code (2, or 3 when
    the ImageNet weights are unavailable)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ParamError as e:  # a library error names parameters; here they are options
            raise _UserError(_as_flags(one_line(str(e)), e.names)) from None
        except ImetError as e:
            raise _UserError(one_line(str(e)), e.exit_code) from None
        except OSError as e:  # a full disk, a permission taken away mid-run: one line, not a traceback
            where = f"{e.filename}: " if e.filename is not None else ""
            raise _UserError(f"{where}{e.strerror or one_line(str(e))}") from None


def _as_flags(message: str, names: tuple[str, ...]) -> str:
    """The message with each parameter name written as its option, e.g. min_labels -> --min-labels."""
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "--" + name.replace("_", "-"), message)
    return message


class _LogHandler(logging.Handler):
    """Log records on stderr through tqdm.write, so a progress bar on the terminal is not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbose: int, quiet: bool) -> None:
    """The `imet` logger on stderr for this command: INFO (progress, epochs), DEBUG with -v, WARNING with -q.
    Undone when the command ends, so a program (or test) that calls the CLI keeps its own logging."""
    logger = logging.getLogger("imet")
    handler, level, propagate = _LogHandler(), logger.level, logger.propagate
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # a root handler of the caller would print every line twice

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate

    click.get_current_context().call_on_close(undo)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=imet.__version__, prog_name="imet")
@click.option("-v", "--verbose", count=True, help="More log output (debug messages).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only: no progress, no epoch lines.")
def cli(verbose: int, quiet: bool) -> None:
    """imet: frozen ResNet50 + HOG features in one HDF5 store, light heads on top, Kaggle submissions out.

    \b
    imet synth DIR                      write a synthetic dataset in the Kaggle layout
    imet summary DIR                    splits and label statistics of a data dir
    imet featurize DIR --out S.h5       ResNet50 maps + pooled vectors + HOG per view into a store
    imet store info|verify|merge|compact  look into, check, assemble or compact stores
    imet fit --store S --head H --out M train a head on train, tune decoding on val
    imet predict --store S --model M    Kaggle submission (and per-image probabilities)
    imet predict --data DIR --model M   the same straight from test images, no store (Kaggle kernels)
    imet evaluate --store S --model M.. F2 / F1 / precision / recall per model (Table 1)
    imet report --store S --model M.. --out DIR   HTML page of the paper's section 5 figures
    imet blend fit|apply                tune a blend of models on val probabilities, apply it
    imet model info M                   what a model, folds, blend or stack file holds (--json)
    imet stack P1.h5 P2.h5 --out S.json second-stage LightGBM over out-of-fold probabilities
    imet explain --store S --model M --data DIR --ids A,B --out D   attention overlays (Figure 4)

    Long steps show a progress bar with rate and ETA on a terminal, a line every 30 s otherwise.
    """
    setup_logging(verbose, quiet)
    os.environ["MPLBACKEND"] = "agg"  # imet draws PNG files with matplotlib's Figure API; a bad value broke the import


def _data_options(f):
    f = click.option("--min-label-count", default=3, show_default=True, type=click.IntRange(min=1),
                     help="Drop labels seen fewer times than this, with the images that carry them.")(f)
    f = click.option("--split-seed", default=0, show_default=True, type=SEED,
                     help="Seed of the stratified 8:1:1 train/val/test split.")(f)
    return f


@cli.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=300, show_default=True, type=click.IntRange(min=10),
              help="Labelled images to write (train.csv).")
@click.option("--test-images", default=None, type=click.IntRange(min=0),
              help="Unlabelled Kaggle test images (default: a tenth of --images).")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Random seed; the same seed writes the same files.")
@click.option("--corrupt", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also write this many awkward train images, cycling through: truncated PNG, "
                   "zero-byte file, grayscale, RGBA, 16-bit.")
def synth_command(out_dir: Path, images: int, test_images: int | None, seed: int, corrupt: int) -> None:
    """Write a synthetic iMet-like dataset to OUT_DIR (Kaggle layout, no download needed)."""
    from imet.synth import write_synthetic

    check_paths({}, {"OUT_DIR": out_dir}, dirs=("OUT_DIR",))
    info = write_synthetic(out_dir, images=images, test_images=test_images, seed=seed, corrupt=corrupt)
    click.echo(info)


@cli.command("summary")
@click.argument("data_dir", type=click.Path(path_type=Path))
@_data_options
def summary_command(data_dir: Path, min_label_count: int, split_seed: int) -> None:
    """Print the splits and label statistics of a Kaggle-layout DATA_DIR."""
    from imet.data import load_dataset, summary

    click.echo(summary(load_dataset(data_dir, min_label_count=min_label_count, split_seed=split_seed)))


class ShardType(click.ParamType):
    """I/N: shard I (from 0) of N."""

    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            index, count = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N (e.g. 0/4)", param, ctx)
        if not 0 <= index < count:
            self.fail(f"shard {value}: I must be in 0..N-1", param, ctx)
        return index, count


class SplitsType(click.ParamType):
    """Comma-separated split names, e.g. kaggle-test or train,val."""

    name = "SPLIT[,SPLIT]"

    def convert(self, value, param, ctx):
        from imet.labels import SPLITS

        if isinstance(value, tuple):
            return value
        names = tuple(dict.fromkeys(x.strip() for x in str(value).split(",") if x.strip()))
        unknown = [x for x in names if x not in SPLITS]
        if not names or unknown:
            self.fail(f"{value!r}: choose one or more of {', '.join(SPLITS)}, comma-separated", param, ctx)
        return names


class _DeclaredCommand(click.Command):
    """A command whose options are partly made from declarations (`declared()`), when first needed rather than
    when the CLI starts (making them imports the declaring modules, hence torch, which other commands do not
    need). The declared options follow the command's own."""

    def declared(self) -> list[click.Option]:
        raise NotImplementedError

    @property
    def params(self) -> list[click.Parameter]:
        if self._all is None:
            self._all = self._own + self.declared()
        return self._all

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own, self._all = list(value), None


def declared_options(params: dict, defaults: dict) -> list[click.Option]:
    """One option per declared parameter, defaulting to None (left out: the declaration's default applies,
    shown in brackets)."""
    return [_option(name, spec.check, f"{spec.help} [{_shown(spec, defaults[name])}]")
            for name, spec in params.items()]


def _shown(spec, default) -> str:
    return spec.none if default is None else ("on" if default else "off") if isinstance(default, bool) else str(default)


def _option(name: str, check, text: str) -> click.Option:
    """A click option for a declared constraint: its type from the constraint, default None."""
    from imet import params as p

    flag = name.replace("_", "-")
    if isinstance(check, p.Bool):
        return click.Option([f"--{flag}/--no-{flag}", name], default=None, help=text)
    if isinstance(check, p.Int):  # a Bound (labels, workers, channels) is checked by the library once it is known
        high = check.high if isinstance(check.high, int) else None
        kind = click.IntRange(check.low, high) if (check.low, high) != (None, None) else click.INT
    elif isinstance(check, p.Float):
        kind = click.FloatRange(check.low, check.high, min_open=check.low_open, max_open=check.high_open)
    elif isinstance(check, p.Choice):
        kind = click.Choice(check.values)
    else:
        kind = click.Path(dir_okay=False) if check.path else click.STRING
    return click.Option([f"--{flag}", name], type=kind, default=None, help=text)


def _given(options: dict) -> dict:
    """The declared options the user gave (the others keep the library's defaults)."""
    return {k: v for k, v in options.items() if v is not None}


class _FeaturizeCommand(_DeclaredCommand):
    def declared(self) -> list[click.Option]:
        from dataclasses import fields

        from imet.featurize.options import Options  # the declarations alone: no torch for --help or a wrong flag

        return declared_options(Options.params, {f.name: f.default for f in fields(Options)})


@cli.command("featurize", cls=_FeaturizeCommand)
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HDF5 store to write (an unfinished one with the same settings is resumed).")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="DataLoader workers decoding images (and computing HOG with --hog-impl skimage) "
                   "[default: from the core count, see imet.featurize.pipeline.resources].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the backbone runs; auto takes CUDA when present.")
@click.option("--hog/--no-hog", default=True, show_default=True, help="Write HOG features (linear_hog needs them).")
@click.option("--hog-orientations", default=8, show_default=True, type=click.IntRange(min=1),
              help="HOG orientation bins.")
@click.option("--hog-cell", default=16, show_default=True, type=click.IntRange(min=2), help="HOG cell side in pixels.")
@click.option("--hog-block", default=3, show_default=True, type=click.IntRange(min=1), help="HOG block side in cells.")
@click.option("--shard", default=None, type=ShardType(),
              help="Write only shard I of N (next to --out); assemble them with `imet store merge`.")
@click.option("--splits", default=None, type=SplitsType(),
              help="Featurize only these splits' images, e.g. kaggle-test for a new test set [all]. A model "
                   "fitted on another store of the same features predicts from it.")
@click.option("--dry-run", is_flag=True,
              help="Print the views and bytes per array these settings make, then stop (nothing is written).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_data_options
@config.option
def featurize_command(data_dir: Path, out: Path, workers: int | None, device: str, hog: bool,
                      hog_orientations: int, hog_cell: int, hog_block: int, shard: tuple[int, int] | None,
                      splits: tuple[str, ...] | None, dry_run: bool, quiet: bool, min_label_count: int,
                      split_seed: int, **declared) -> None:
    """Featurize every view of DATA_DIR into one memory-mappable HDF5 store (resumable).

    Under torchrun, each rank writes a shard of contiguous views and rank 0 merges them.
    """
    from imet.featurize.options import HogParams, Options

    opts = Options(hog=HogParams(hog_orientations, hog_cell, hog_block) if hog else None, splits=splits,
                   split_seed=split_seed, min_label_count=min_label_count, **_given(declared))  # refused before torch
    from imet.featurize import pipeline
    from imet.featurize.distributed import run_featurize

    if dry_run:
        click.echo(pipeline.dry_run(data_dir, out, opts))
        return
    from imet.data import input_paths

    weights = opts.weights if Path(opts.weights).is_file() else None
    check_paths({"DATA_DIR": input_paths(data_dir), "--weights": weights}, {"--out": out})
    click.echo(run_featurize(data_dir, out, opts, device=device, workers=workers, shard=shard, progress=not quiet))


@cli.group("store", cls=_Group)
def store_group() -> None:
    """Look into, check or assemble feature stores."""


@store_group.command("info")
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
def store_info_command(store_path: Path) -> None:
    """What is in STORE: sizes, completeness and the settings it was made with."""
    _found([store_path], [])
    from imet.store import describe

    click.echo(_store_info_text(describe(store_path)))


def _store_info_text(info: dict) -> str:
    """`store info`'s lines from `store.describe`'s data."""
    from imet.store import human_bytes

    full, (start, stop), n, st = info["full_imet_views"], info["view_range"], info["views"], info["status"]
    lines = [f"store        {info['path']} ({info['disk_bytes'] / 2**20:.1f} MiB on disk)",
             f"fingerprint  {info['fingerprint']}",
             f"labels       {info['labels']} ({info['cultures']} culture)",
             "images       " + ", ".join(f"{s} {k}" for s, k in info["images"].items()),
             f"views        {n}" + (f" (this shard: {start}..{stop})" if (start, stop) != (0, n) else ""),
             f"status       done {st['done']}, failed {st['failed']}, pending {st['pending']}"
             + ("  (complete)" if not st["pending"] else "  (INCOMPLETE: rerun imet featurize)")]
    for key, f in info["features"].items():
        lines.append(f"features     {key:<7} {f['shape']} {f['dtype']}, {f['bytes'] / 2**20:.1f} MiB, "
                     f"{f['bytes_per_view']:,} B/view, {human_bytes(f['bytes_per_view'] * full)} at full iMet")
    total = sum(f["bytes_per_view"] for f in info["features"].values())
    lines.append(f"full iMet    {human_bytes(total * full)} of features at {total:,} B/view for "
                 f"{full:,} views (train + stage-1 test images, six views each)")
    lines += [f"codec        {key:<7} {text}" for key, text in info["codecs"].items()]
    lines += [f"setting      {key} = {json.dumps(value)}" for key, value in info["settings"].items()]
    return "\n".join(lines)


@store_group.command("verify")
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
def store_verify_command(store_path: Path) -> None:
    """Check STORE: schema, shapes, labels, done mask, no NaN/inf in finished views. Exit code 1 on problems."""
    from imet.store import verify

    problems = verify(store_path)
    for p in problems:
        click.echo(f"problem: {p}")
    if problems:
        raise SystemExit(1)
    click.echo(f"{store_path}: ok")


class _CompactCommand(_DeclaredCommand):
    def declared(self) -> list[click.Option]:
        from dataclasses import fields

        from imet.codec import Request

        return declared_options(Request.params, {f.name: f.default for f in fields(Request)})


@store_group.command("compact", cls=_CompactCommand)
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The compact store to write (a new file).")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seed of the train views the codecs are fitted on.")
def store_compact_command(store_path: Path, out: Path, seed: int, **declared) -> None:
    """Re-encode STORE's maps (and HOG) through a channel PCA / int8 codec into a new, smaller store.

    The codec is fitted on a seeded sample of STORE's train views; models fitted on STORE do not read
    the new store (its features are others): fit them on it.
    """
    _found([store_path], [])
    check_paths({"STORE": store_path}, {"--out": out})
    from imet.featurize.compact import compact_store

    done = compact_store(store_path, out, seed=seed, **_given(declared))
    before, after = done["bytes_before"], done["bytes_after"]
    click.echo(f"wrote {done['out']}: " + "; ".join(f"{k} {c.describe(width)}" for k, (width, c) in
                                                    done["codecs"].items())
               + f"; features {before:,} -> {after:,} bytes per view ({before / after:.1f}x smaller)")


def head_options() -> list[click.Option]:
    """One `imet fit` option per head parameter, made from the heads' declarations: the type from its
    constraint, the help and the defaults (per head where they differ) from the heads themselves. Every
    option defaults to None, so a parameter left out takes the head's own default."""
    from imet.heads.params import DECLARED  # the declarations alone: no torch for --help or a wrong flag

    taken: dict[str, list[tuple[str, object, object]]] = {}  # parameter -> (head, spec, default)
    for cls in sorted(DECLARED.values(), key=lambda c: (len(c.param_names()), c.name)):  # shared ones first
        defaults = cls.param_defaults()
        for name, spec in cls.param_specs().items():
            taken.setdefault(name, []).append((cls.name, spec, defaults[name]))
    return [_head_option(name, uses, len(DECLARED)) for name, uses in taken.items()]


def _head_option(name: str, uses: list[tuple[str, object, object]], n_heads: int) -> click.Option:
    from imet import params as p

    helps: dict[str, list[str]] = {}
    defaults: dict[str, list[str]] = {}
    for head, spec, default in uses:
        helps.setdefault(spec.help, []).append(head)
        defaults.setdefault(_shown(spec, default), []).append(head)
    if len(helps) == 1 and len(uses) == n_heads:
        text = next(iter(helps))
    else:
        text = " ".join(f"{', '.join(heads)}: {h}" for h, heads in helps.items())
    shown = next(iter(defaults)) if len(defaults) == 1 else "; ".join(
        f"{', '.join(heads)}: {d}" for d, heads in defaults.items())
    check = uses[0][1].check
    if isinstance(check, p.Choice):  # every head's values (start: csra, random or paper); the head refuses others'
        check = p.Choice(tuple(dict.fromkeys(v for _, spec, _ in uses for v in spec.check.values)))
    return _option(name, check, f"{text} [{shown}]")


class _DecodingCommand(_DeclaredCommand):
    """`blend fit` and `stack`: one option per decoding parameter (imet.decode.spec), calibrated by default."""

    def declared(self) -> list[click.Option]:
        from dataclasses import asdict

        return declared_options(DECODING, asdict(ENSEMBLE))


def _decoding(declared: dict) -> Decoding:
    """The Decoding of `blend fit` or `stack`: the options given, ENSEMBLE's values for the others."""
    return replace(ENSEMBLE, **_given(declared))


class _FitCommand(_DeclaredCommand):
    """`imet fit`: one option per head parameter (see head_options)."""

    def declared(self) -> list[click.Option]:
        return head_options()


def _found(stores: list, models: list, probs: list = ()) -> None:
    """Refuse a store, model (or blend, stack) file or probabilities file that is not there, in the words of the
    library's own check (imet.store, imet.loader, imet.probfiles), before a command's heavy imports (torch, h5py):
    a mistyped path answers at once."""
    for paths, what in ((stores, "store"), (models, "model file"), (probs, "probabilities file")):
        for path in paths:
            if path is not None and Path(path).is_dir():
                raise ImetError(f"{path}: a directory, not a {what}")
            if path is not None and not Path(path).is_file():
                raise ImetError(f"{path}: {what} not found")


def _with(options: list):
    """A decorator applying click options in the order listed (the first is shown first in --help)."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


@cli.command("fit", cls=_FitCommand)
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path), help="Feature store.")
@click.option("--head", required=True, help="Head to train: linear, linear_hog, lgbm, attn_rnn, csra or mldecoder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model file to write (atomically).")
@click.option("--folds", type=click.IntRange(min=2),
              help="Fit K models on K folds of the train and val images (iterative stratification), tune decoding "
                   "on their out-of-fold probabilities, write the K models in one file (test stays held out).")
@click.option("--fold-seed", default=0, show_default=True, type=SEED, help="--folds: seed of the folds (recorded).")
@click.option("--oof", "oof_path", type=click.Path(dir_okay=False, path_type=Path),
              help="--folds: also write the out-of-fold probabilities (HDF5, for imet blend fit and imet stack).")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one row per epoch (head, epoch, loss, val F2, lr, seconds, views/s) to this .csv or .jsonl "
                   "file as training goes (val F2 is then scored every epoch); lgbm writes one row for its fit.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the rows as TensorBoard event files into this folder (needs the optional "
                   "tensorboard package).")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the last finished epoch's training state in this folder; the same command resumes from it, "
                   "its --metrics file cut back to the epochs the checkpoint holds (a checkpoint of other options or "
                   "another store is refused).")
@config.option
def fit_command(store_path: Path, head: str, out: Path, folds: int | None, fold_seed: int, oof_path: Path | None,
                metrics_path: Path | None, tensorboard_dir: Path | None, checkpoint_dir: Path | None,
                **options) -> None:
    """Train a head on the train views of a store, tune its decoding on val, write the model.

    Options left out take the head's own defaults (shown in brackets, per head where they differ);
    options a head does not take are refused. Under torchrun (`torchrun --nproc-per-node N -m imet fit ...`)
    csra, mldecoder and attn_rnn train one model across the ranks; rank 0 writes it.
    """
    from imet.heads.params import declared

    _found([store_path], [options.get("init_from")])
    check_paths({"--store": store_path, "--init-from": options.get("init_from")},
                {"--out": out, "--oof": oof_path, "--metrics": metrics_path, "--tensorboard": tensorboard_dir,
                 "--checkpoint": checkpoint_dir}, dirs=("--tensorboard", "--checkpoint"))
    params = {k: v for k, v in options.items() if v is not None}
    declared(head).check_names(params)  # a wrong head or option is refused before torch is imported
    from imet.heads import make_head
    from imet.metrics import evaluate_head, table
    from imet.runtime import torchrun_world
    from imet.store import FeatureStore

    world = torchrun_world()
    if world > 1 and (folds is not None or oof_path is not None):
        raise ImetError("--folds and --oof fit in one process; run them without torchrun")
    recorded = [n for n, v in (("--metrics", metrics_path), ("--tensorboard", tensorboard_dir),
                               ("--checkpoint", checkpoint_dir)) if v is not None]
    if folds is not None or oof_path is not None:
        if recorded:
            raise ImetError(f"{recorded[0]} records one fit; --folds and --oof fit several: leave one of them out")
        from imet.folds import fit_and_save_folds

        click.echo(fit_and_save_folds(store_path, head, params, folds, out, oof_path, fold_seed=fold_seed))
        return
    model = make_head(head, **params)
    store = FeatureStore(store_path)
    with _recording(model, store, world, metrics_path, tensorboard_dir, checkpoint_dir):
        if world > 1:  # torchrun: all ranks train one model (imet.heads.ddp); rank 0 alone goes on to write it
            from imet.heads.ddp import fit_distributed

            if not fit_distributed(model, store, world):
                return
        else:
            model.fit(store)
    model.save(out)
    row = {"model": str(out), "head": head, **evaluate_head(model, store, "val")}
    where = f" on {world} processes" if world > 1 else ""
    click.echo(f"wrote {out} ({model.fit_seconds_:.1f} s to fit{where}); {model.decoding()}; val:")
    click.echo(table([row]))


def _recording(model, store, world: int, metrics_path: Path | None, tensorboard_dir: Path | None,
               checkpoint_dir: Path | None):
    """The metrics log and checkpoint of `imet fit` around the fit (each only when asked for), checked first."""
    from imet import checkpoint

    if metrics_path is not None:
        checkpoint.check_metrics_path(metrics_path)
    if tensorboard_dir is not None:
        checkpoint.tensorboard_writer_class()
    main = world == 1 or os.environ.get("RANK") == "0"  # under torchrun rank 0 alone writes
    saved = None
    if checkpoint_dir is not None:
        from imet.heads.train import TrainedHead

        if not isinstance(model, TrainedHead):  # lgbm: boosters of their own, no epochs to resume from
            raise ImetError(f"--checkpoint: {model.name} does not train in epochs, so there is nothing to resume; "
                            "fit it without --checkpoint")
        saved = checkpoint.Checkpoint.open(checkpoint_dir, head=model.name, params=model.get_params(),
                                           store=store.fingerprint, create=main)
    log = None
    if main and (metrics_path is not None or tensorboard_dir is not None):
        resume = saved.epochs_done() if saved is not None and saved.has_state() else None
        log = checkpoint.MetricsLog(metrics_path, resume=resume, tensorboard=tensorboard_dir)
    return checkpoint.recording(log, saved, scores=metrics_path is not None or tensorboard_dir is not None)


@cli.command("predict")
@click.option("--store", "store_path", type=click.Path(path_type=Path), help="Feature store (or give --data).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Predict straight from the test images of this Kaggle-layout dir (sample_submission.csv "
                   "order), with no store: views, backbone and head in one pass, resumable.")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Model file from fit, or a blend or stack file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Submission CSV to write (id,attribute_ids with the original attribute ids): a file, replaced "
                   "whole; - for standard output; or a FIFO or device, written in place.")
@click.option("--split", default=None, type=click.Choice(["kaggle-test", "test", "val"]),
              help="--store: images to predict, the Kaggle test set (sample_submission order) or a labelled "
                   "split [kaggle-test].")
@click.option("--probs", "probs_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write per-image probabilities (HDF5) for `imet blend`.")
@click.option("--attention", "attention_path", type=click.Path(dir_okay=False, path_type=Path),
              help="--store, attn_rnn: also write, per image and predicted label, the attention map of the step "
                   "that emitted it (HDF5).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="--data: the backbone's state-dict file, when the model's store was made from one (its "
                   "sha256 must match) [the model's: random, or imagenet from the torch cache].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="--data: where the backbone runs; auto takes CUDA when present.")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="--data: DataLoader workers decoding images and computing HOG [1 on CPU, up to 8 on CUDA].")
@click.option("--quiet", is_flag=True, help="--data: no progress output.")
def predict_command(store_path: Path | None, data_dir: Path | None, model_path: Path, out: Path, split: str | None,
                    probs_path: Path | None, attention_path: Path | None, weights: Path | None, device: str,
                    workers: int | None, quiet: bool) -> None:
    """Write a Kaggle submission for a split of a store, or for the test images of a data dir (--data)."""
    if (store_path is None) == (data_dir is None):
        raise ImetError("predict: give exactly one of --store STORE or --data DIR")
    if data_dir is None:
        _found([store_path], [model_path])
        check_paths({"--store": store_path, "--model": model_path},
                    {"--out": out, "--probs": probs_path, "--attention": attention_path}, streams=("--out",))
        from imet.predict import predict

        done = predict(store_path, model_path, out, split=split or "kaggle-test", probs_path=probs_path,
                       attention_path=attention_path)
        click.echo(f"wrote {out}: {done['images']} images of {done['split']}, {done['labels_per_image']:.2f} labels "
                   "per image", err=_stream(out))
        _echo_written(done, err=_stream(out))
        return
    if split not in (None, "kaggle-test") or attention_path is not None:
        raise ImetError("predict --data predicts the test images; --split and --attention need --store")
    _found([], [model_path])
    from imet.stream import predict_images

    done = predict_images(data_dir, model_path, out, weights=weights, probs_path=probs_path, device=device,
                          workers=workers, progress=not quiet)
    click.echo(f"wrote {out}: {done['images']} test images of {data_dir}, computed {done['computed']} this run",
               err=_stream(out))
    _echo_written(done, err=_stream(out))


def _stream(out: Path) -> bool:
    """Whether an output is written in place into a stream (-, a FIFO, a device): the command's own
    messages then go to stderr, so standard output holds the submission alone."""
    from imet.files import IN_PLACE, target

    return target(out)[0] == IN_PLACE


def _echo_written(done: dict, err: bool = False) -> None:
    """The notes and extra outputs of a predict run."""
    if done["no_view"]:
        click.echo(f"note: {done['no_view']} image(s) had no usable view and were written with no labels", err=err)
    if done["probs"] is not None:
        click.echo(f"wrote {done['probs']}: per-image probabilities", err=err)
    if done.get("attention") is not None:
        click.echo(f"wrote {done['attention']}: attention maps of {done['attention_labels']} predicted labels",
                   err=err)


STORE_AND_MODELS = [  # evaluate and report
    click.option("--store", "store_path", required=True, type=click.Path(path_type=Path), help="Feature store."),
    click.option("--model", "model_paths", required=True, multiple=True, type=click.Path(path_type=Path),
                 help="Model file; repeat for several, or list more after the options."),
    click.argument("more_models", nargs=-1, type=click.Path(path_type=Path)),
    click.option("--split", default="val", show_default=True, type=click.Choice(["val", "test"]),
                 help="Labelled split to score."),
]


@cli.command("evaluate")
@_with(STORE_AND_MODELS)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as JSON (a file, or a FIFO or device written in place).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as CSV (a file, or a FIFO or device written in place).")
def evaluate_command(store_path: Path, model_paths: tuple[Path, ...], more_models: tuple[Path, ...], split: str,
                     json_path: Path | None, csv_path: Path | None) -> None:
    """Score models on a labelled split: sample-averaged F2, F1, precision, recall (the paper's Table 1)."""
    _found([store_path], [*model_paths, *more_models])
    check_paths({"--store": store_path, "--model": [*model_paths, *more_models]},
                {"--json": json_path, "--csv": csv_path}, streams=("--json", "--csv"))
    from imet.metrics import table
    from imet.predict import evaluate, write_rows

    rows = evaluate(store_path, [*model_paths, *more_models], split)
    click.echo(table(rows))
    with atomic_paths(json_path, csv_path) as (json_tmp, csv_tmp):  # both or neither
        for path, as_json in ((json_tmp, True), (csv_tmp, False)):
            if path is not None:
                write_rows(rows, path, as_json=as_json)


@cli.command("report")
@_with(STORE_AND_MODELS)
@click.option("--label", default=None,
              help="Label of the confusion matrix: a name (tag::men) or an attribute id [most frequent in train].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write index.html and its PNG figures into.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Data dir for the attention overlays of attention heads [recorded in the store].")
def report_command(store_path: Path, model_paths: tuple[Path, ...], more_models: tuple[Path, ...], split: str,
                   label: str | None, out: Path, data_dir: Path | None) -> None:
    """Write an HTML page of the paper's section 5 for the models: Table 1, ROC, examples, confusion matrix.

    Prints the path of the page (index.html in --out); it opens offline in any browser.
    """
    _found([store_path], [*model_paths, *more_models])
    from imet.report import write_report

    check_paths({"--store": store_path, "--model": [*model_paths, *more_models],
                 "--data": _images_of(data_dir, store_path)}, {"--out": out}, replaced=("--out",))
    click.echo(write_report(store_path, [*model_paths, *more_models], out, split=split, label=label,
                            data_dir=data_dir))


@cli.command("explain")
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path), help="Feature store.")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Model of an attention head: attn_rnn, csra or mldecoder.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The data dir the store was featurized from (its images are redrawn) [recorded in the store].")
@click.option("--ids", required=True, help="Comma-separated image ids.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory for the PNGs.")
def explain_command(store_path: Path, model_path: Path, data_dir: Path, ids: str, out: Path) -> None:
    """Overlay the attention of each predicted label on the view that emitted (or scored) it (Figure 4)."""
    _found([store_path], [model_path])
    from imet.explain import write_overlays
    from imet.heads import load_model
    from imet.store import FeatureStore

    check_paths({"--store": store_path, "--model": model_path, "--data": _images_of(data_dir, store_path)},
                {"--out": out}, dirs=("--out",))
    wanted = [i.strip() for i in ids.split(",") if i.strip()]
    if not wanted:
        raise ImetError(f"--ids {ids!r}: no image id given; list them comma-separated, e.g. --ids ID1,ID2")
    for path in write_overlays(FeatureStore(store_path), load_model(model_path), data_dir, wanted, out):
        click.echo(path)


@cli.group("blend", cls=_Group)
def blend_group() -> None:
    """Blend probabilistic models: tune weights and decoding on val probabilities, apply them elsewhere.

    \b
    imet predict --store S --model A.pt --split val --probs a_val.h5   (and so for each model)
    imet blend fit a_val.h5 b_val.h5 --out blend.json
    imet blend apply --blend blend.json a_test.h5 b_test.h5 --out submission.csv
    imet evaluate --store S --model A.pt B.pt blend.json --split test   (a blend file is a model there)
    """


def _images_of(data_dir: Path | None, store_path: Path) -> list[Path]:
    """The inputs of report and explain that redraw images: the data dir given, else the store's own."""
    from imet.data import input_paths
    from imet.store import recorded_data_dir

    return input_paths(data_dir if data_dir is not None else recorded_data_dir(store_path))


@blend_group.command("fit", cls=_DecodingCommand)
@click.argument("prob_files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Blend file to write (JSON: models, weights, decoding rule).")
@click.option("--store", "store_path", type=click.Path(path_type=Path),
              help="Instead of PROB_FILES: predict --split of this store with the --model files.")
@click.option("--model", "model_paths", multiple=True, type=click.Path(path_type=Path),
              help="With --store: a model file to blend; repeat for each.")
@click.option("--split", default="val", show_default=True, type=click.Choice(["val", "test"]),
              help="With --store: the labelled split to tune on.")
@click.option("--weights", default="per-label", show_default=True, type=click.Choice(BLEND_WEIGHTINGS),
              help="One weight per model, or per label: each label with --min-positives positives on the tuning "
                   "split gets its own, chosen by its average precision there (the others keep the global ones).")
@click.option("--min-positives", default=BLEND_MIN_POSITIVES, show_default=True, type=click.IntRange(1),
              help="--weights per-label: positives a label needs on the tuning split to get its own weights.")
@config.option
def blend_fit_command(prob_files: tuple[Path, ...], out: Path, store_path: Path | None, model_paths: tuple[Path, ...],
                      split: str, weights: str, min_positives: int, **declared) -> None:
    """Tune blend weights and decoding on labelled probability files (predict --split val --probs, or fit --folds
    --oof), one per model; or on --model files predicting a split of --store."""
    if bool(prob_files) == (store_path is not None or bool(model_paths)):
        raise ImetError("blend fit: give PROB_FILES, or --store with --model files, not both")
    _found([store_path], list(model_paths))
    check_paths({"PROB_FILES": list(prob_files), "--store": store_path, "--model": list(model_paths)}, {"--out": out})
    from imet.blend import fit_blend

    click.echo(fit_blend(list(prob_files), out, store_path=store_path, model_paths=list(model_paths), split=split,
                         decoding=_decoding(declared), weights=weights, min_positives=min_positives))


@blend_group.command("apply")
@click.argument("prob_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--blend", "blend_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Blend file from imet blend fit (or stack file from imet stack).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Submission CSV: a file, replaced whole; - for standard output; or a FIFO or device, written "
                   "in place.")
@click.option("--probs", "probs_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the blended per-image probabilities (HDF5).")
def blend_apply_command(prob_files: tuple[Path, ...], blend_path: Path, out: Path, probs_path: Path | None) -> None:
    """Blend probability files of the blend's models on one split (test, kaggle-test...) into a submission."""
    _found([], [blend_path], list(prob_files))
    check_paths({"PROB_FILES": list(prob_files), "--blend": blend_path}, {"--out": out, "--probs": probs_path},
                streams=("--out",))
    from imet.predict import apply_blend

    click.echo(apply_blend(blend_path, list(prob_files), out, probs_out=probs_path), err=_stream(out))


@cli.command("stack", cls=_DecodingCommand)
@click.argument("prob_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Stack file to write (JSON: models, LightGBM booster, decoding rule).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the stacker's folds and trees.")
@config.option
def stack_command(prob_files: tuple[Path, ...], out: Path, seed: int, **declared) -> None:
    """Fit a second-stage LightGBM over labelled probability files of several models (best: fit --folds --oof).

    Apply it with `imet blend apply --blend STACK ...`, or give it as a --model to evaluate, report, predict.
    """
    _found([], [], list(prob_files))
    check_paths({"PROB_FILES": list(prob_files)}, {"--out": out})
    from imet.stack import fit_stack

    click.echo(fit_stack(list(prob_files), out, decoding=_decoding(declared), seed=seed))


@cli.group("model", cls=_Group)
def model_group() -> None:
    """Look into model files: heads, --folds files, blends and stacks."""


@model_group.command("info")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print it as one JSON object (machine-readable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write MODEL's head and parameters (a head or --folds file) as a TOML file that "
                   "`imet fit --config FILE --store STORE --out M` refits it from.")
def model_info_command(model_path: Path, as_json: bool, config_path: Path | None) -> None:
    """What MODEL (any model, folds, blend or stack file) holds: head, parameters, decoding rule, the feature
    identity of its store, labels, val scores, sha256 and, for a blend or stack, where each member is found."""
    _found([], [model_path])
    check_paths({"MODEL": model_path}, {"--config": config_path})
    from imet.models import describe_model, fit_config

    if config_path is not None:
        text = fit_config(model_path)
        with atomic_paths(config_path) as (tmp,):
            tmp.write_text(text, encoding="utf-8")
        click.echo(f"wrote {config_path}: imet fit --config {config_path} --store STORE --out M refits {model_path}",
                   err=as_json)
    info = describe_model(model_path)
    click.echo(json.dumps(info, indent=1) if as_json else "\n".join(_info_lines(info)))


def _info_lines(info: dict) -> list[str]:
    """`imet model info` as text: one fact a line, members indented."""
    dec, labels = info["decoding"], info["labels"]
    by = f" (written by imet {info['imet_version']})" if info.get("imet_version") else ""
    lines = [f"{info['path']}: {info['format']} version {info['version']}{by}, head {info['head']}",
             f"sha256: {info['sha256']}",
             "parameters: " + (", ".join(f"{k}={_plain(v)}" for k, v in info["params"].items()) or "none"),
             f"decoding: {dec['text']}"]
    if "groups" in dec:
        groups = "; ".join(f"{'every label' if g['kind'] == '*' else g['kind']}: threshold {g['threshold']:.4g}, "
                           f"labels {g['min_labels']}{'+' if g['max_labels'] is None else '-' + str(g['max_labels'])}"
                           for g in dec["groups"])
        ct = dec["class_thresholds"]
        per_class = "" if ct is None else f"; {ct['count']} per-class thresholds in {ct['min']:.4g}..{ct['max']:.4g}"
        undo = f"class weights undone at power {dec['power']:g}" if dec["power"] else "class weights not undone"
        lines.append(f"  mode {dec['mode']}: {groups}{per_class}; {undo}")
    feats = info["features"]
    if feats is not None:
        lines.append(f"features: store fingerprint {feats['fingerprint']}; "
                     + ", ".join(f"{k} {tuple(v)}" for k, v in feats["layout"].items())
                     + "".join(f"; {k} codec: {c['text']}" for k, c in feats["codecs"].items()))
        lines.append("  settings: " + ", ".join(f"{k}={_plain(v)}" for k, v in sorted(feats["settings"].items())))
    kinds = ", ".join(f"{k} {n}" for k, n in labels["kinds"].items())
    lines.append(f"labels: {labels['count']} ({kinds})")
    lines.append("scores: " + ", ".join(f"{k.replace('_f2', '')} F2 {v:.4f}" for k, v in info["scores"].items()))
    if info["members"]:
        lines.append(f"members ({len(info['members'])}):")
    for m in info["members"]:
        if "fold" in m:
            lines.append(f"  fold {m['fold']}: {m['head']}, {m['held_out_images']} held-out images, "
                         f"F2 there {m['val_f2']:.4f}")
            continue
        weight = f", weight {m['weight']:.2f}" if "weight" in m else ""
        if "label_weights" in m:
            weight += (f" on average over labels ({min(m['label_weights']):.2f}.."
                       f"{max(m['label_weights']):.2f})")
        alone = f", F2 alone {m['val_f2']:.4f}" if "val_f2" in m else ""
        lines.append(f"  {m['head']} {m['model']}{weight}{alone}")
        lines.append(f"    sha256 {m['sha256']}; " + (f"found at {m['found']}" if m["found"] else "NOT FOUND")
                     + "".join(f"; {x['path']}: {x['what']}" for x in m["looked"]))
    return lines


def _plain(value) -> str:
    """A parameter or setting for a line of text: JSON, strings bare, None as none."""
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@store_group.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The store to write.")
def store_merge_command(shards: tuple[Path, ...], out: Path) -> None:
    """Merge finished shards (from `imet featurize --shard I/N`) into one store, atomically.

    Refuses shards that disagree on settings, overlap or leave gaps. The shards are kept.
    """
    _found(list(shards), [])
    from imet.store import merge

    if out.exists():
        raise ImetError(f"{out}: exists; merge writes a new store (remove it or choose another --out)")
    check_paths({"SHARDS": list(shards)}, {"--out": out})
    merge(list(shards), out)
    click.echo(f"merged {len(shards)} shards into {out}")


def main() -> None:
    faulthandler.enable()  # the last resort: a native crash (SIGSEGV, SIGABRT) still says where it happened
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        cli(prog_name="imet")
        return
    # A torchrun rank ends without the interpreter's teardown: a rank that had finished (process group destroyed,
    # every file written and closed) aborted there ("terminate called without an active exception", no Python
    # frame) in 1 of 85 two-rank fits on busy cores and once in make test, and torchrun reported the run failed.
    code = 0
    try:
        cli(prog_name="imet")  # click ends every run, a successful one too, with SystemExit
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
