"""The applications: what ``python -m minidora`` runs, built on the core.

- :mod:`.demo`: ``minidora demo``, pretrain a small GPT and fine-tune it with every method.
- :mod:`.finetune`: ``minidora finetune``, the built-in model or a real LLM on instruction data.
- :mod:`.train`: ``minidora train``, QLoRA and QDoRA with FSDP2 or DDP on one process or many.
- :mod:`.verify`: ``minidora verify``, the conformance kit (:mod:`minidora.testing`) from a shell.
- :mod:`.common`: what they share (option checks and limits, the cache folder, the schedule,
  peak memory, plots and JSON), under public names.

Each command's module (``demo.cli``, ``finetune.cli``, ``train.cli``, ``verify``) has
``add_parser(subparsers)``, which returns the new parser, and ``run(args)``, which returns the
exit status; :mod:`minidora.__main__` only dispatches to them. The demo is also the library of
the other two: its GPT, texts, progress lines and compute dtype.

The rule: an application imports the core's public names only (no ``_name`` of a core module),
and shares code with another application through :mod:`.common` or another module's public
names; the core (everything in ``minidora`` outside ``apps`` and ``__main__``) imports no
application. Nothing is imported here, so the command line starts without torch.
"""
