"""The restricted torch-archive reader (dictionary_learning ae.pt) against torch.save, and crafted views.

A tensor in a torch archive is a view (storage offset, size, stride) into a
storage; a view past its storage's end must be refused before numpy reads it.
"""

import json
import pickletools
import zipfile

import numpy as np
import pytest
import torch

import emjax.sae
from emjax.sae.unpickle import UnsafePickleError, load_state_dict


def save_views(path):
    """torch.save of two views of one 12-element storage (a transpose and an offset slice) and a scalar."""
    w = torch.arange(12.0).reshape(3, 4)
    state = {"W_enc": w.t(), "b_enc": w[1, 1:], "k": torch.tensor(8)}
    torch.save(state, path)
    return {k: v.numpy() for k, v in state.items()}


def rewrite(path, member_suffix, edit):
    """Rewrite one archive member (found by its name's ending) through `edit(bytes) -> bytes`."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in members if n.endswith(member_suffix))
    members[name] = edit(members[name])
    with zipfile.ZipFile(path, "w") as archive:
        for n, data in members.items():
            archive.writestr(n, data)


def set_view(data: bytes, tensor: int, offset=None, size=None, stride=None) -> bytes:
    """The pickle with the storage offset / first size / first stride of the `tensor`-th view replaced.

    After each storage's persistent id, torch writes offset, size..., stride... as small ints.
    """
    ops = list(pickletools.genops(data))
    persid = [i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID"][tensor]
    ints = [pos for op, _, pos in ops[persid + 1 :] if op.name == "BININT1"]
    out = bytearray(data)
    # This tensor is 1-D (the offset slice): its ints are offset, size[0], stride[0].
    for pos, value in zip(ints, (offset, size, stride)):
        if value is not None:
            out[pos + 1] = value
    return bytes(out)


def test_torch_views_load_as_torch_reads_them(tmp_path):
    want = save_views(tmp_path / "ae.pt")
    got = load_state_dict(tmp_path / "ae.pt")
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize(
    "view, reads",
    [
        (dict(offset=10), "element 12"),  # offset 10 + 3 elements runs past the 12-element storage
        (dict(size=200), "element 204"),
        (dict(stride=9), "element 23"),
    ],
)
def test_a_view_past_its_storage_is_refused_naming_file_and_tensor(tmp_path, view, reads):
    save_views(tmp_path / "ae.pt")
    rewrite(tmp_path / "ae.pt", "data.pkl", lambda data: set_view(data, 1, **view))
    with pytest.raises(UnsafePickleError, match=rf"ae\.pt: tensor 'b_enc' reads {reads} of a storage of 12 elements"):
        load_state_dict(tmp_path / "ae.pt")


def test_a_crafted_view_is_refused_through_sae_load(tmp_path):
    save_views(tmp_path / "ae.pt")
    rewrite(tmp_path / "ae.pt", "data.pkl", lambda data: set_view(data, 1, size=250))
    trainer = {"dict_class": "AutoEncoder", "activation_dim": 4, "dict_size": 3}
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer}))
    with pytest.raises(UnsafePickleError, match=r"ae\.pt: tensor 'b_enc' reads element"):
        emjax.sae.load(tmp_path)


def test_a_storage_shorter_than_it_claims_is_refused(tmp_path):
    save_views(tmp_path / "ae.pt")
    rewrite(tmp_path / "ae.pt", "data/0", lambda data: data[:20])
    with pytest.raises(UnsafePickleError, match=r"ae\.pt: storage .*data/0 holds 20 bytes, fewer than its 12 elements"):
        load_state_dict(tmp_path / "ae.pt")
