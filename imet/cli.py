"""The `imet` command: a thin click layer. Each command parses, calls one library function, reports."""

from __future__ import annotations

from pathlib import Path

import click

from imet.errors import ImetError


class _UserError(click.ClickException):
    exit_code = 2


class _Group(click.Group):
    """Turns ImetError (bad input, refused operation) into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ImetError as e:
            raise _UserError(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="imet")
def cli() -> None:
    """imet: frozen ResNet50 + HOG features in one HDF5 store, light heads on top, Kaggle submissions out.

    \b
    imet synth DIR                      write a synthetic dataset in the Kaggle layout
    imet summary DIR                    splits and label statistics of a data dir
    imet featurize DIR --out S.h5       ResNet50 maps + pooled vectors + HOG per view into a store
    imet store info|verify|merge        look into, check or assemble stores
    """


def _data_options(f):
    f = click.option("--min-label-count", default=3, show_default=True, type=click.IntRange(min=1),
                     help="Drop labels seen fewer times than this, with the images that carry them.")(f)
    f = click.option("--split-seed", default=0, show_default=True, type=int,
                     help="Seed of the stratified 8:1:1 train/val/test split.")(f)
    return f


@cli.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=300, show_default=True, type=click.IntRange(min=10),
              help="Labelled images to write (train.csv).")
@click.option("--test-images", default=None, type=click.IntRange(min=0),
              help="Unlabelled Kaggle test images (default: a tenth of --images).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed; the same seed writes the same files.")
@click.option("--corrupt", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also write this many awkward train images, cycling through: truncated PNG, "
                   "zero-byte file, grayscale, RGBA, 16-bit.")
def synth_command(out_dir: Path, images: int, test_images: int | None, seed: int, corrupt: int) -> None:
    """Write a synthetic iMet-like dataset to OUT_DIR (Kaggle layout, no download needed)."""
    from imet.synth import write_synthetic

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


@cli.command("featurize")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HDF5 store to write (an unfinished one with the same settings is resumed).")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet (torchvision's, from the torch cache), random (seeded by --seed) or a "
                   "state-dict file of torchvision's resnet50.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --weights random.")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=32),
              help="Side of each square view in pixels.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Views per backbone batch (part of the settings: batches are fixed for exact resumes).")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="DataLoader workers decoding images and computing HOG [default: 1 on CPU, up to 8 on CUDA].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the backbone runs; auto takes CUDA when present.")
@click.option("--normalize", default="imagenet", show_default=True, type=click.Choice(["imagenet", "train"]),
              help="Pixel mean/std: ImageNet's, or the train set's as in the paper.")
@click.option("--maps/--no-maps", default=True, show_default=True,
              help="Write the 14x14x2048 maps (attn_rnn needs them).")
@click.option("--hog/--no-hog", default=True, show_default=True, help="Write HOG features (linear_hog needs them).")
@click.option("--hog-orientations", default=8, show_default=True, type=click.IntRange(min=1),
              help="HOG orientation bins.")
@click.option("--hog-cell", default=16, show_default=True, type=click.IntRange(min=2), help="HOG cell side in pixels.")
@click.option("--hog-block", default=3, show_default=True, type=click.IntRange(min=1), help="HOG block side in cells.")
@click.option("--limit", default=None, type=click.IntRange(min=1),
              help="At most this many images per split (for a quick try).")
@click.option("--view-seed", default=0, show_default=True, type=int, help="Seed of the crops, flips and jitter.")
@click.option("--shard", default=None, type=ShardType(),
              help="Write only shard I of N (next to --out); assemble them with `imet store merge`.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@_data_options
def featurize_command(data_dir: Path, out: Path, weights: str, seed: int, image_size: int, batch_size: int,
                      workers: int | None, device: str, normalize: str, maps: bool, hog: bool,
                      hog_orientations: int, hog_cell: int, hog_block: int, limit: int | None, view_seed: int,
                      shard: tuple[int, int] | None, quiet: bool, min_label_count: int, split_seed: int) -> None:
    """Featurize every view of DATA_DIR into one memory-mappable HDF5 store (resumable).

    Under torchrun, each rank writes a shard of contiguous views and rank 0 merges them.
    """
    from imet.featurize.distributed import run_featurize
    from imet.featurize.hog import HogParams
    from imet.featurize.pipeline import Options

    opts = Options(weights=weights, seed=seed, image_size=image_size, batch_size=batch_size, normalize=normalize,
                   maps=maps, hog=HogParams(hog_orientations, hog_cell, hog_block) if hog else None, limit=limit,
                   view_seed=view_seed, split_seed=split_seed, min_label_count=min_label_count)
    click.echo(run_featurize(data_dir, out, opts, device=device, workers=workers, shard=shard, progress=not quiet))


@cli.group("store", cls=_Group)
def store_group() -> None:
    """Look into, check or assemble feature stores."""


@store_group.command("info")
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
def store_info_command(store_path: Path) -> None:
    """What is in STORE: sizes, completeness and the settings it was made with."""
    from imet.store import describe

    click.echo(describe(store_path))


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


def main() -> None:
    cli(prog_name="imet")
