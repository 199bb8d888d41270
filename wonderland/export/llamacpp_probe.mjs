// Greedy continuations and next-token log-probabilities from a real llama.cpp (node-llama-cpp).
//
// Called by wonderland/export/llamacpp.py. Reads one JSON request on stdin:
//   {"nlc": "<node_modules/node-llama-cpp>", "model": "<.gguf>", "lora": "<.lora.gguf>" | null,
//    "prompts": [[token ids]...], "n": 32, "stop": [ids], "want": [[[ids per step]...] per prompt],
//    "threads": 1}
// or {"nlc", "model", "texts": [...]} for llama.cpp's tokens of each text: {"tokens": [[...]]}.
// and writes {"results": [{"tokens": [...], "logprobs": [[logp of want[i][t]...] per step]}]}
// (logprobs for the first want[i].length steps only).
// Token ids go in as they are (no re-tokenising here: the tokenizers are compared elsewhere).
// With temperature 0 node-llama-cpp's sampler chain is llama.cpp's greedy sampler alone, which
// leaves the logits as the model computed them; the probabilities it returns are their softmax
// over the whole vocabulary, so log(p) is the log-softmax of llama.cpp's raw logits.
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const req = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(join(req.nlc, "dist", "index.js")).href);

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0 });
if (req.texts) {  // tokenizer check: llama.cpp's tokens for each text (special tokens parsed)
  process.stdout.write(JSON.stringify({ tokens: req.texts.map((t) => Array.from(model.tokenize(t, true))) }));
  await model.dispose();
  await llama.dispose();
  process.exit(0);
}
const longest = Math.max(...req.prompts.map((p) => p.length)) + req.n + 8;
const context = await model.createContext({
  contextSize: Math.max(256, longest), sequences: 1, threads: req.threads || 1,
  ...(req.lora ? { lora: { adapters: [{ filePath: req.lora, scale: 1.0 }] } } : {}),
});
const sequence = context.getSequence();
const stop = new Set(req.stop);
// yieldEogToken: without it node-llama-cpp ends the reply at EOS / <|im_end|> *without* yielding
// that token, and every reply that ends before N tokens would lack its stop token
const greedy = { temperature: 0, yieldEogToken: true };
const results = [];
for (let i = 0; i < req.prompts.length; i++) {
  await sequence.clearHistory();
  const tokens = [];
  const logprobs = [];
  const want = (req.want && req.want[i]) || [];
  // probabilities cost ~25 ms a step (the whole vocabulary crosses into JS), so they are read for
  // the steps that have `want` ids only; the rest of the reply decodes without them
  let input = req.prompts[i];
  if (want.length) {
    for await (const out of sequence.evaluateWithMetadata(input, { probabilities: true }, greedy)) {
      logprobs.push(want[tokens.length].map((id) => Math.log(out.probabilities.get(id) ?? 0)));
      tokens.push(out.token);
      if (tokens.length >= Math.min(req.n, want.length) || stop.has(out.token)) break;
    }
    input = [tokens[tokens.length - 1]];
  }
  if (tokens.length < req.n && !stop.has(tokens[tokens.length - 1])) {
    for await (const token of sequence.evaluate(input, greedy)) {
      tokens.push(token);
      if (tokens.length >= req.n || stop.has(token)) break;
    }
  }
  results.push({ tokens, logprobs });
}
process.stdout.write(JSON.stringify({ results }));
await context.dispose();
await model.dispose();
await llama.dispose();
