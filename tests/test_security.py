"""Paths and names from configs cannot make the project write outside the folders it is given."""

import pytest
from store_helpers import NO_AUGMENT, TEACHERS, write_jsonl

from distill.config import TrainConfig
from distill.train import run_dir
from embed_cache.corpus.prepare import PrepareConfig, SourceSpec, prepare
from embed_cache.errors import JasperError
from pipeline.config import load_pipeline_config


@pytest.mark.parametrize("override", ["out=runs/../../elsewhere", "cache.out=../cache.zarr",
                                      "train.run_dir=runs/demo/../../../train"])
def test_pipeline_paths_cannot_climb_out_with_dot_dot(override):
    with pytest.raises(JasperError, match=r"climbs out of its folder with '\.\.'.*absolute path"):
        load_pipeline_config("tiny", overrides=[override])


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_a_run_name_is_a_folder_name_never_a_path(name):
    with pytest.raises(JasperError, match="used as a folder name"):
        run_dir(TrainConfig(name=name))
    with pytest.raises(JasperError, match="climbs out"):
        run_dir(TrainConfig(run_dir="runs/../../x"))
    assert str(run_dir(TrainConfig(name="paper-v2.1"))) == "runs/paper-v2.1"


def test_prepare_refuses_a_store_path_climbing_out_and_writes_nothing(tmp_path):
    source = write_jsonl(tmp_path / "corpus.jsonl", ["one text", "another text"])
    out = tmp_path / "a" / ".." / ".." / "store.zarr"
    config = PrepareConfig(sources=[SourceSpec(path=str(source))], teachers=TEACHERS, total=2, out=str(out),
                           augment=NO_AUGMENT)
    with pytest.raises(JasperError, match="climbs out"):
        prepare(config, log=lambda *_: None)
    assert not (tmp_path.parent / "store.zarr").exists()
