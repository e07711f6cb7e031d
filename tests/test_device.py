"""Device-agnostic decoding: the decoding code names a device for every tensor it creates, and random streams
deliver their draws on the device a decode runs on (so moving the models is all a GPU run needs)."""

import ast
from pathlib import Path

import torch

from mulosd.decoding.sampling import RandomStreams

DECODING = Path(__file__).resolve().parents[1] / "src" / "mulosd" / "decoding"
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "tensor", "rand", "randn", "randint", "eye", "linspace"}


def factory_calls_without_device(source: str) -> list[int]:
    """Line numbers of ``torch.<factory>(...)`` calls that name neither a device nor a generator."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            if not {"device", "generator"} & {k.arg for k in node.keywords}:
                lines.append(node.lineno)
    return lines


def test_the_check_finds_a_tensor_created_on_the_default_device():
    assert factory_calls_without_device("import torch\nx = torch.arange(3)\ny = torch.zeros(2, device=x.device)\n") == [2]


def test_decoding_creates_every_tensor_on_a_named_device():
    offenders = {p.name: lines for p in sorted(DECODING.glob("*.py"))
                 if (lines := factory_calls_without_device(p.read_text()))}
    assert offenders == {}, f"torch factories without device= (the tensor would land on the CPU): {offenders}"


def test_streams_deliver_on_their_device_and_share_positions_when_moved():
    a = RandomStreams.from_seed(3, range(2))
    b = RandomStreams.from_seed(3, range(2), device="meta")
    assert b.uniform(4).device.type == "meta" and b.normal(2).device.type == "meta"
    first = a.uniform(3)
    moved = a.to("meta")
    moved.uniform(3)  # advances the same generators
    again = RandomStreams.from_seed(3, range(2))
    again.uniform(3)
    again.uniform(3)
    assert torch.equal(a.uniform(5), again.uniform(5)) and first.device.type == "cpu"
    # rows= draws only for the selected streams, whatever the device
    sel = RandomStreams.from_seed(3, range(2), device="meta").uniform(2, rows=torch.tensor([True, False]))
    assert sel.shape == (2, 2) and sel.device.type == "meta"
