"""Multi-task prompt serving: many tasks' prompts in one bank, any mix of them in one batch.

* :class:`TaskRegistry` (:mod:`lopa.serving.registry`) -- the tasks' prompt parameters (ULPT
  ``z``/``scale``/``shift`` and the projection seed, PT ``Z``, LoPA ``Z_S`` and heads) in
  stacked tensors on the device (:mod:`lopa.serving.store`); add / replace / remove by name
  at run time, load saved checkpoints, report memory.
* :class:`PromptBank` (:mod:`lopa.serving.bank`) -- the front end: a registry
  (``bank.registry``) bound to a Hugging Face model (``bank.binding``).
  :meth:`PromptBank.assemble` turns a batch of ``(task, token ids)`` requests into the frozen
  model's ``inputs_embeds`` / ``attention_mask`` / ``position_ids``: :meth:`PromptBank.parse`
  validates them (:mod:`lopa.serving.requests`), :meth:`PromptBank.build` assembles the
  valid ones in a constant number of kernel launches (:mod:`lopa.serving.assembly`).
* :meth:`PromptBank.generate` -- completions for a mixed batch on a causal LM, greedy or
  sampled with per-request seeds, each equal to serving the request alone
  (:mod:`lopa.serving.generation`).
* :meth:`PromptBank.classify` -- label probabilities at each request's last token from the
  label words' logits only (:mod:`lopa.serving.classify`, verbalizers in
  :mod:`lopa.serving.labels`).
* Both run PT / ULPT rows behind their task's prompt prefix, computed once per task and kept
  across calls under a memory budget (:mod:`lopa.serving.prefill`,
  :mod:`lopa.serving.prefix_cache`; :meth:`PromptBank.prefix_cache_info`).
* :meth:`PromptBank.prompt_embeds` -- one request's ``(m + n, d)`` input for vLLM's
  ``{"prompt_embeds": ...}`` prompt input (a task's prompt rows bitwise the same in every
  request, so vLLM's prefix cache reuses them).

Bad requests (unknown task, empty or over-long input, out-of-vocabulary ids, bad fields...;
see :mod:`lopa.serving.requests`) get a :class:`RequestError` each; the rest of the batch is
served.
"""
from lopa.serving.requests import ERROR_CODES, Request, RequestError, ServingBatch
from lopa.serving.bank import ModelBinding, PromptBank
from lopa.serving.classify import Classification
from lopa.serving.generation import Completion
from lopa.serving.prefix_cache import PrefixCacheInfo
from lopa.serving.registry import BankMemory, TaskRegistry

__all__ = ["PromptBank", "TaskRegistry", "ModelBinding", "BankMemory", "Request", "RequestError", "ServingBatch",
           "Completion", "Classification", "PrefixCacheInfo", "ERROR_CODES"]
