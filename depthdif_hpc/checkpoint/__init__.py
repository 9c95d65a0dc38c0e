"""Checkpoints on disk: the format's only owner (file names, atomic publication, completeness,
run-folder resolution), the weight readers for every form a run leaves behind, the export
command and `load_model` for inference.

* `layout`: names and folder operations of `<run_dir>/checkpoints/step_XXXXXXXX/`.
* `weights`: full fp32 weights from a checkpoint (DDP or any ZeRO stage), an export or a torch file.
* `export`: `depthdif-export RUN_OR_CKPT --out DIR` (consolidated safetensors + config).
* `loading`: `load_model(path)` -> (config, model in eval mode).
"""
