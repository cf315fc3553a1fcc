"""energytools.TableTemperatures: a score table's per-sample temperatures and energy groups by
sample id, on the batch's device, without a read back to the host."""
import numpy as np
import polars as pl
import pytest
import torch

import energytools


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A table over 300 of the ids 0..999 (gaps between them), from random logits."""
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(1000, 300, replace=False))
    logits = rng.normal(size=(300, 5)) * 3
    path = tmp_path_factory.mktemp("table") / "scores.parquet"
    return energytools.write_score_table(path, logits, rng.integers(0, 5, 300), sample_ids=ids)


def test_temperatures_and_groups_are_the_tables_for_random_ids(table):
    frame = pl.read_parquet(table)
    lookup = energytools.TableTemperatures(table)
    picked = np.random.default_rng(1).choice(frame["sample_id"].to_numpy(), 500)  # repeats, any order
    expected = pl.DataFrame({"sample_id": picked}).join(frame, on="sample_id", how="left", validate="m:1",
                                                        maintain_order="left")
    t = lookup(torch.from_numpy(picked))
    assert t.dtype == torch.float32 and t.tolist() == pytest.approx(expected["temperature"].to_list())
    groups = [energytools.TableTemperatures.GROUPS[g] for g in lookup.groups(torch.from_numpy(picked)).tolist()]
    assert groups == expected["energy_group"].cast(str).to_list()
    assert len(set(t.tolist())) == 3  # the three groups' temperatures all occur


def test_ids_outside_the_table_are_nan_and_the_check_names_one(table):
    frame = pl.read_parquet(table)
    lookup = energytools.TableTemperatures(table)
    absent = int(np.setdiff1d(np.arange(1000), frame["sample_id"].to_numpy())[0])
    present = int(frame["sample_id"][0])
    ids = torch.tensor([present, absent, -3, 5000])
    t = lookup(ids)
    assert not torch.isnan(t[0]) and torch.isnan(t[1:]).all()
    assert lookup.groups(ids).tolist()[1:] == [-1, -1, -1]
    with pytest.raises(energytools.UserError, match=f"sample_id {absent} is not in the score table"):
        lookup(ids, check=True)
    lookup.check(torch.tensor([present]))  # all present: nothing raised


def test_the_lookup_runs_on_the_batchs_device_without_a_host_read(table):
    """Meta tensors hold no values: a read back to the host (item, nonzero, bool) would raise."""
    lookup = energytools.TableTemperatures(table)
    ids = torch.zeros(64, dtype=torch.int64, device="meta")
    t, groups = lookup(ids), lookup.groups(ids)
    assert t.device.type == "meta" and t.shape == (64,) and groups.device.type == "meta"
    with pytest.raises(NotImplementedError):  # meta tensors refuse a data-dependent shape
        lookup.check(ids)  # the check reads: it is the one call that may
