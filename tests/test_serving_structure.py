"""Serving split by job: a task registry, the front end (PromptBank) and generation talk through
public names only; the registry works on its own; PromptBank keeps its API."""
import ast
import pathlib

import pytest
import torch

import lopa
from lopa.serving import PromptBank, TaskRegistry

import tiny_models as tm
from test_serving_lopa import _serving_backends

SERVING = pathlib.Path(lopa.__file__).parent / "serving"
SPLIT = ("registry.py", "bank.py", "generation.py", "requests.py", "store.py", "prefix_cache.py", "prefill.py",
         "classify.py", "labels.py")
TORCH_NAMES = {"_version"}  # torch's in-place version counter of a tensor (the prefix cache's model fingerprint)


def _private_reaches(path: pathlib.Path):
    """``x._name`` with ``x`` not ``self`` / ``cls``, and ``from m import _name``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and node.attr not in TORCH_NAMES):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield f"{path.name}:{node.lineno}: .{node.attr}"
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_"):
                    yield f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"


@pytest.mark.parametrize("name", SPLIT)
def test_no_private_name_is_reached_from_another_module(name):
    assert list(_private_reaches(SERVING / name)) == []


def test_the_registry_alone_holds_tasks_and_locates_them():
    g = torch.Generator().manual_seed(0)
    registry = TaskRegistry(16)
    registry.add_pt(["a", "b", "c"], torch.randn(3, 4, 16, generator=g))
    registry.add_ulpt("u", torch.randn(5, 2, generator=g))
    sub, task_id = registry.locate("b")
    assert sub.method == "pt" and task_id == 1 and registry.locate("nope") is None
    assert torch.equal(sub.live("weight")[task_id], registry.prompt("b"))
    registry.remove("a")  # "c" moves into row 0
    assert registry.locate("c")[1] == 0 and registry.first_names(2) == ["b", "c"] and len(registry) == 3
    assert registry.info("c")["task_id"] == 0


def test_the_bank_is_a_registry_bound_to_a_model():
    model = tm.llama()
    bank = PromptBank.for_model(model)
    assert isinstance(bank.registry, TaskRegistry) and bank.model is model
    binding = bank.binding
    assert binding.pad_token_id == 0 and binding.max_length == 256 and binding.passes_position_ids
    assert binding.encoder.model is model and binding.encoder_shares_vocab and binding.gathers_rows
    bank.add("p", lopa.PromptTuning(3, tm.WIDTH))
    assert "p" in bank.registry and bank.registry.locate("p") is not None
    # parse then build is assemble
    requests = [("p", [4, 5]), ("nope", [1])]
    parsed = bank.parse(requests)
    built = bank.build(parsed.rows)
    assembled = bank.assemble(requests)
    assert [e.code for e in parsed.errors] == ["unknown_task"] and assembled.errors == parsed.errors
    assert torch.equal(built.inputs_embeds, assembled.inputs_embeds)
    storage = PromptBank(8)
    assert storage.binding is None and storage.model is None and storage.encoder is None


def test_backends_take_the_librarys_names_and_torch_as_an_alias():
    g = torch.Generator().manual_seed(1)
    bank = PromptBank(16)
    bank.add_pt(["a", "b"], torch.randn(2, 3, 16, generator=g))
    bank.add_ulpt("u", torch.randn(4, 2, generator=g))
    table = torch.randn(30, 16, generator=g)
    requests = [("a", [1, 2]), ("u", [3, 4, 5]), ("b", [6])]
    reference = bank.assemble(requests, embedding_weight=table, backend="reference")
    assert torch.equal(bank.assemble(requests, embedding_weight=table, backend="torch").inputs_embeds,
                       reference.inputs_embeds)
    for name in ["auto"] + [b for b in _serving_backends() if b not in ("torch", "reference")]:
        other = bank.assemble(requests, embedding_weight=table, backend=name)
        torch.testing.assert_close(other.inputs_embeds, reference.inputs_embeds, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'cpp', 'reference', 'torch'"):
        bank.assemble(requests, embedding_weight=table, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        PromptBank(16, backend="fast")
