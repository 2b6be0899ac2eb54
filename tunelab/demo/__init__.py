"""The bundled demo task: synthetic clinical notes to strict JSON (`clinical`), its vocabulary pools (`vocab`)
and its scoring (`scoring`). The `make demo` pipeline trains on it and compares base vs fine-tuned."""
