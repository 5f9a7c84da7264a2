"""The declared parameters of the attn_rnn head (constraints and help; defaults are in its constructor).

They belong in `AttnRNNHead.params`, next to its constructor; they live here only while attn_rnn.py is
being reworked elsewhere, and `imet.heads` attaches them to the class.
"""

from __future__ import annotations

from imet.heads.attn_model import POOLS
from imet.heads.attn_rnn import VOTES
from imet.heads.maps import DEVICE_PARAMS
from imet.heads.params import Bool, Choice, Float, Int, Param, Text
from imet.heads.train import TRAINING_PARAMS

ATTN_RNN_PARAMS = TRAINING_PARAMS | DEVICE_PARAMS | {
    "hidden": Param(Int(1), "LSTM width."),
    "attention_dim": Param(Int(1), "Hidden width of f_att."),
    "pred_dim": Param(Int(1), "Hidden width of f_pred."),
    "dropout": Param(Float(0, 1, high_open=True), "Dropout in f_pred."),
    "attention": Param(Bool(), "Attention over the map cells; off: the mean of the map as context (ablation)."),
    "residual": Param(Bool(), "p_t = sigmoid(f_pred(h_t) + f_R's logits), not the paper's eq. 5."),
    "pool": Param(Choice(POOLS), "Candidate pool of Algorithm 2 (predicted), or only the true labels (ablation)."),
    "hog": Param(Bool(), "f_R reads pooled ⊕ HOG (section 3.4)."),
    "init_from": Param(Text("a model file name", path=True),
                       "Start f_R and f_att from a fitted linear (with hog: linear_hog) model file, or use a fitted "
                       "csra or mldecoder model (same hog) as f_R, its first v_pred.", none="train from scratch"),
    "beam": Param(Int(1), "Beam width K."),
    "steps": Param(Int(1), "Most labels per path T.", none="the most labels of a train image"),
    "view_vote": Param(Choice((*VOTES, "tune")), "An image's labels are those emitted by any (the paper's union), "
                                                 "half or all of its views; tune picks one on val with gamma."),
    "patience": Param(Int(0), "Early stopping: epochs without a better val F2 (decoded at the best gamma) before "
                              "stopping, keeping the best epoch (0: off)."),
}
