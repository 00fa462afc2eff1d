// AudioWorklet of the dashboard's "try it" panel: hands the microphone's first channel to the page in ~2048-sample blocks.
"use strict";

class EdgevoiceCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(2048);
    this.fill = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let i = 0;
      while (i < channel.length) {
        const n = Math.min(channel.length - i, this.block.length - this.fill);
        this.block.set(channel.subarray(i, i + n), this.fill);
        this.fill += n;
        i += n;
        if (this.fill === this.block.length) {
          this.port.postMessage(this.block, [this.block.buffer]);
          this.block = new Float32Array(2048);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("edgevoice-capture", EdgevoiceCapture);
