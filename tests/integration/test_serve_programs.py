"""A replica's compiled programs: a batch padded up to the program's size answers like the library's forward, and
images straight from the transform (whose size-1 dimensions carry any stride) run without a recompile."""

import io

import numpy as np
import torch
from PIL import Image

from pipeline.serve.policy import Rung
from pipeline.serve.replica import LadderReplica, rung_program
from supervit import SubnetConfig, SuperViT, get_arch, gflops
from supervit.data.transforms import load_image


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_a_padded_batch_through_a_compiled_program_answers_like_the_library():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10).eval()
    subnet = SubnetConfig.parse("g4_k0.5")
    program = rung_program(model, subnet, 4, "compiled", torch.device("cpu"), torch.float32)
    replica = LadderReplica.__new__(LadderReplica)  # only what `_forward` reads: no Ray, no Serve
    replica.device, replica.dtype = torch.device("cpu"), torch.float32
    replica.programs = {(subnet.name, 4): program}
    rung = Rung(subnet.name, gflops(arch, subnet, 10), 50.0, {4: 1.0})
    images = [load_image(_png(i), arch.img_size, arch.in_chans, train=False) for i in range(7)]
    with torch.no_grad():
        expected = model(torch.stack(images), subnet).softmax(dim=1)
    torch._dynamo.config.error_on_recompile = True  # a guard failing on the served inputs would raise here
    try:
        for n in (1, 3, 4, 7):  # padded to 4; 7 runs as two calls
            got = replica._forward(rung, torch.stack(images[:n]))
            assert got.shape == (n, 10)
            np.testing.assert_allclose(got.numpy(), expected[:n].numpy(), rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_a_package_is_built_once_then_loaded_and_answers_like_the_library(tmp_path):
    """`--mode packaged`: the first start builds a rung's AOTInductor package, a restart loads it (no compile), a
    damaged package is built again, and other weights never load it."""
    from pipeline.serve.packages import package_path, packaged_program, weights_digest

    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10).eval()
    subnet = SubnetConfig.parse("g4_k0.5")
    cpu = torch.device("cpu")
    digest = weights_digest(model)
    path = package_path(tmp_path, "tiny-x", digest, subnet.name, 2, "cpu", "float32", torch.get_num_threads())
    program, build_s, built = packaged_program(model, subnet, 2, cpu, torch.float32, path)
    assert built and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    _, load_s, built_again = packaged_program(model, subnet, 2, cpu, torch.float32, path)
    assert not built_again and load_s < build_s / 5
    replica = LadderReplica.__new__(LadderReplica)
    replica.device, replica.dtype = cpu, torch.float32
    replica.programs = {(subnet.name, 2): program}
    rung = Rung(subnet.name, gflops(arch, subnet, 10), 50.0, {2: 1.0})
    images = torch.stack([load_image(_png(i), arch.img_size, arch.in_chans, train=False) for i in range(3)])
    with torch.no_grad():
        expected = model(images, subnet).softmax(dim=1)
    np.testing.assert_allclose(replica._forward(rung, images).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    path.write_bytes(path.read_bytes()[:1000])  # damaged
    _, _, rebuilt = packaged_program(model, subnet, 2, cpu, torch.float32, path)
    assert rebuilt
    with torch.no_grad():
        model.head.bias.add_(1.0)
    other = package_path(tmp_path, "tiny-x", weights_digest(model), subnet.name, 2, "cpu", "float32", 1)
    assert other.parent.parent != path.parent.parent  # other weights: another folder
