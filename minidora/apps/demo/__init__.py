"""The main job: pretrain a small GPT, fine-tune it with every method, compare.

``python -m minidora demo`` (:mod:`.cli`) runs :func:`minidora.apps.demo.main.run`: pretrain the
GPT of :mod:`.model` on text A (or load it from the cache), fine-tune it on text B with full
fine-tuning, LoRA, DoRA, QLoRA and QDoRA under the same budget and several seeds (:mod:`.train`),
sweep the adapters' rank (:mod:`.sweep`), then print the tables (mean and range over the seeds,
rows told apart only where the ranges do not overlap: :mod:`.compare`) and write the plots and
the JSON (:mod:`.report`). See docs/demo.md for what each column means.

Modules, in reading order: :mod:`.data` (the shipped texts, tokenization, split), :mod:`.model`
(the GPT), :mod:`.precision` (the default compute dtype for this CPU, and why), :mod:`.progress`
(progress lines when stdout is not a terminal), :mod:`.train` (pretraining and fine-tuning),
:mod:`.memory` (peak tensor memory), :mod:`.compare` (mean, range and verdicts over seeds),
:mod:`.report` (table, plots, JSON), :mod:`.sweep` (the rank sweep), :mod:`.main` (the whole
run), :mod:`.cli` (the options); finetune and train use :mod:`.data`, :mod:`.model`,
:mod:`.precision` and :mod:`.progress` too. Nothing is imported here, so
``python -m minidora.apps.demo.data`` (which rewrites the shipped texts) runs cleanly.
"""
