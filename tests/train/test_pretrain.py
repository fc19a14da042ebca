"""The pretraining recipe's pieces: held-out files as the validation set."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd.model import Transformer
from herd.train import PRETRAINING, train
from herd.train.data import PackedDataset, byte_tokenizer
from herd.train.dcp import load_checkpoint
from herd.train.settings import model_args

from .pretrain_utils import make_corpus, tiny_settings


def test_held_out_files_as_the_validation_set(tmp_path):
    held_out = make_corpus(tmp_path / "held_out", n_files=1, seed=7)
    s = tiny_settings(tmp_path, f"data.val_paths=[{held_out}]", "train.steps=3", "eval.sequences=4")
    res = train(s, PRETRAINING)
    # the eval loss is the trained model's loss on the held-out file's first 4 windows
    ids = np.array(byte_tokenizer().encode((held_out / "doc0.txt").read_text(), bos=True, eos=True))
    ds = PackedDataset(ids, 64, "train", 0.0)
    model = Transformer(model_args(s))
    load_checkpoint(res.checkpoint, model)
    x = torch.from_numpy(np.stack([ds[j][0] for j in range(4)]))
    y = torch.from_numpy(np.stack([ds[j][1] for j in range(4)]))
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert res.val_loss == pytest.approx(want, rel=1e-4)
