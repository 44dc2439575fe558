"""data.split names data.train's split; data.eval picks its own with DIR:split (rm, dpo, kto as sft)."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dd") / "prefs"

    def rows(tag):
        return [{"prompt": f"{tag} prompt {i}", "chosen": f"{tag} good {i}", "rejected": f"{tag} bad {i}",
                 "label": True, "completion": f"{tag} answer {i}"} for i in range(3)]

    DatasetDict({"dev": Dataset.from_list(rows("dev")), "test": Dataset.from_list(rows("test"))}).save_to_disk(folder)
    return folder


def test_dpo_train_split_does_not_leak_into_eval(saved):
    from kilter.trainers.dpo import DPOData, load_pairs

    data = DPOData(train=str(saved), split="dev", eval=f"{saved}:test")
    train, _ = load_pairs(data.train, data, data.split)
    held, _ = load_pairs(data.eval, data)
    assert {r["prompt"].split()[0] for r in train} == {"dev"} and {r["prompt"].split()[0] for r in held} == {"test"}


def test_kto_train_split_does_not_leak_into_eval(saved):
    from kilter.trainers.kto import KTOData, _load

    data = KTOData(train=str(saved), split="dev", eval=f"{saved}:test")
    assert {r["prompt"].split()[0] for r in _load(data.train, data, data.split)} == {"dev"}
    assert {r["prompt"].split()[0] for r in _load(data.eval, data)} == {"test"}


def test_rm_train_split_does_not_leak_into_eval(saved):
    from kilter.distributed import DistInfo
    from kilter.trainers.rm import RMConfig, _read_data

    cfg = RMConfig(data={"train": str(saved), "split": "dev", "eval": f"{saved}:test", "kind": "comparison"})
    train, held, _ = _read_data(cfg, DistInfo())
    assert {g["prompt"].split()[0] for g in train} == {"dev"} and {g["prompt"].split()[0] for g in held} == {"test"}


def test_an_eval_folder_without_its_own_split_does_not_reuse_the_train_split(saved):
    """Before, data.split applied to data.eval too: eval=DIR silently evaluated on the training split."""
    from kilter.errors import KilterError
    from kilter.trainers.dpo import DPOData, load_pairs

    data = DPOData(train=str(saved), split="dev", eval=str(saved))
    with pytest.raises(KilterError, match="split"):  # no 'train' split there: name one with DIR:split
        load_pairs(data.eval, data)
