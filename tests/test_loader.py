"""imet.loader: one registry of model-file formats, `open_model` dispatching on the file's format tag."""

import json

import h5py
import pytest
import torch

from imet.errors import ImetError
from imet.heads import load_model
from imet.loader import FORMATS, register_format
from imet.models import open_model


def test_the_four_formats_are_registered_each_in_its_container():
    assert {tag: f.container for tag, f in FORMATS.items()} == {
        "imet-model": "torch", "imet-folds": "torch", "imet-blend": "json", "imet-stack": "json"}
    with pytest.raises(ValueError, match="'imet-blend' is already registered"):
        register_format("imet-blend", "json", lambda blob, path: None)


@pytest.mark.parametrize("name, write, said", [
    ("other.pt", lambda p: torch.save({"format": "imet-other", "version": 1}, p), "other.pt: not an imet model file"),
    ("list.pt", lambda p: torch.save([1, 2], p), "list.pt: not an imet model file"),
    ("tagged.json", lambda p: p.write_text(json.dumps({"format": "imet-model"})),
     "tagged.json: not an imet blend file"),
    ("blend.pt", lambda p: torch.save({"format": "imet-blend"}, p), "blend.pt: not an imet model file"),
    ("v9.pt", lambda p: torch.save({"format": "imet-model", "version": 9}, p),
     "v9.pt: model format version 9 is not supported"),
    ("v9.json", lambda p: p.write_text(json.dumps({"format": "imet-blend", "version": 9})),
     "v9.json: blend format version 9 is not supported"),
    ("s9.json", lambda p: p.write_text(json.dumps({"format": "imet-stack", "version": 9})),
     "s9.json: stack format version 9 is not supported"),
    ("f9.pt", lambda p: torch.save({"format": "imet-folds", "version": 9}, p),
     "f9.pt: folds format version 9 is not supported"),
    ("broken.json", lambda p: p.write_text('{"format": '), "broken.json: not an imet blend file (JSONDecodeError)"),
    ("models", lambda p: p.mkdir(), "models: a directory, not a model file"),
    ("store.h5", lambda p: h5py.File(p, "w").close(), "store.h5: an HDF5 file (a feature store or a probability "
     "file), not a model file"),
])
def test_a_file_goes_to_the_reader_of_its_tag_or_gets_one_line(tmp_path, name, write, said):
    write(tmp_path / name)
    with pytest.raises(ImetError) as e:
        open_model(tmp_path / name)
    assert str(e.value).startswith(str(tmp_path / said)), str(e.value)


def test_load_model_takes_torch_archives_only(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"format": "imet-blend", "version": 1}))
    with pytest.raises(ImetError, match="b.json: a blend or stack file \\(JSON\\), not a model file"):
        load_model(tmp_path / "b.json")
    with pytest.raises(ImetError, match="none.pt: model file not found"):
        open_model(tmp_path / "none.pt")
