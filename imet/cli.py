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
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed writes the same files.")
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


def main() -> None:
    cli(prog_name="imet")
