"""``gptqlab quantize``: options, the resumable progress folder, the layer-wise driver and the run."""
