"""Registered subnets: any batch size through the pyfunc, tags, and an alias per budget."""

import mlflow
import numpy as np
import pytest
import torch

from pipeline.common.registry import budget_alias, log_subnet_model
from supervit import ArchConfig, SubnetConfig, SuperViT, gflops

ARCH = ArchConfig(
    patch_size=2, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, grids=(4, 6, 8), prune_blocks=(1, 2, 3), in_chans=1
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SuperViT(ARCH, num_classes=10).eval()


def test_budget_alias():
    assert budget_alias("2.3GFLOPs") == "budget-2_3GFLOPs"
    assert budget_alias(" 2.3 gflops ") == "budget-2_3GFLOPs"
    assert budget_alias("450MFLOPs") == "budget-450MFLOPs"
    assert budget_alias("0.5x") == "budget-0_5x"
    with pytest.raises(ValueError, match="cannot parse budget '2.3'"):
        budget_alias("2.3")


def test_registered_subnet_predicts_any_batch_size_by_alias(model, mlflow_uri):
    subnet = SubnetConfig(6, (0.7, 0.5, 0.5))
    alias = budget_alias("0.5x")
    one_image = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    version = log_subnet_model(
        model,
        subnet,
        name="budget0",
        registered_model="supervit-test",
        alias=alias,
        tags={"top1": 91.5, "latency_ms": 0.8, "fingerprint": "abc123"},
        input_example=one_image,  # one image: what specialised the batch dimension before
        tracking_uri=mlflow_uri,
    )
    assert int(version.version) == 1 and alias in version.aliases
    assert version.tags["subnet"] == "g6_k0.7-0.5-0.5" and version.tags["top1"] == "91.5"
    assert float(version.tags["gflops"]) == pytest.approx(gflops(ARCH, subnet, 10), rel=1e-5)
    assert version.tags["fingerprint"] == "abc123" and version.run_id

    loaded = mlflow.pyfunc.load_model(f"models:/supervit-test@{alias}")
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, 16, 16)
    for batch in (1, 2, 64):
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            expected = model(x, subnet).numpy()
        got = loaded.predict(x.numpy())
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_new_version_takes_the_alias_over(model, mlflow_uri):
    alias = budget_alias("2.3GFLOPs")
    for subnet in (SubnetConfig(8, 0.7), SubnetConfig(4, 1.0)):
        last = log_subnet_model(
            model, subnet, name="m", registered_model="supervit-alias", alias=alias, tracking_uri=mlflow_uri
        )
    assert int(last.version) == 2
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_model_version_by_alias("supervit-alias", alias).tags["subnet"] == "g4_k1"
    with pytest.raises(ValueError, match="alias 'latest'"):
        log_subnet_model(model, None, name="m", registered_model="supervit-alias", alias="latest")
