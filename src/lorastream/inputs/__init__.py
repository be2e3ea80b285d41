"""Input families: what can be merged, each planned into the pipeline's outputs.

`inputs.hf`: a Hugging Face model folder (safetensors or .bin, bnb NF4/int8 included) with PEFT adapters;
`inputs.litgpt`: a `litgpt finetune lora` run with its base checkpoint. A family opens its inputs (headers
only), plans each output, and describes it as an `outputs.base.Output` (plan, writer, provenance record, job
id) for `pipeline.run`.
"""
