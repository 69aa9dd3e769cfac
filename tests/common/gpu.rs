//! What the GPU backends' tests (tests/cuda.rs, tests/wgpu.rs) share: the same work run on the CPU's
//! model and on a GPU's, each test comparing the two with its own measure and tolerance.

use gpt2::eval::{Diagnostics, Perplexity};
use gpt2::generate::beam::beam_search;
use gpt2::generate::{Generation, GenerationConfig, Generator};
use gpt2::sampling::SamplingParams;
use gpt2::{Logits, Model, SeqInput, State, Tokenizer};

use super::recorded;

/// One sequence in slot 0.
pub fn one(tokens: &[u32]) -> [SeqInput<'_>; 1] {
    [SeqInput { slot: 0, tokens }]
}

/// Fixture `name`'s recorded sequences on `gpu` and `cpu` (the fixture loaded), token by token
/// through the cache (the GPU's decode path) against every position, then the whole prompt at once
/// (prefill), every position. Returns the largest `diff` from transformers' logits and from the
/// CPU's (token by token).
pub fn vs_recorded(
    name: &str,
    gpu: &Model,
    cpu: &Model,
    diff: fn(&[f32], &[f32]) -> f32,
) -> (f32, f32) {
    let v = cpu.config().vocab_size;
    let (mut vs_hf, mut vs_cpu) = (0f32, 0f32);
    for rec in recorded(name) {
        let mut st = gpu.new_state(1, rec.ids.len()).unwrap();
        let mut cpu_st = cpu.new_state(1, rec.ids.len()).unwrap();
        for (t, tok) in rec.ids.iter().enumerate() {
            let got = gpu.forward(&mut st, &one(&[*tok]), Logits::Last).unwrap();
            let want = cpu
                .forward(&mut cpu_st, &one(&[*tok]), Logits::Last)
                .unwrap();
            vs_hf = vs_hf.max(diff(got, &rec.logits[t * v..(t + 1) * v]));
            vs_cpu = vs_cpu.max(diff(got, want));
        }
        let mut st = gpu.new_state(1, rec.ids.len()).unwrap();
        let got = gpu.forward(&mut st, &one(&rec.ids), Logits::All).unwrap();
        vs_hf = vs_hf.max(diff(got, &rec.logits[..rec.ids.len() * v]));
    }
    (vs_hf, vs_cpu)
}

/// Three decode steps of slots 0 and 1 together (tokens t + 1 and t + 2 for t = 0, 1, 2) on `gpu`
/// and `cpu`, each from its own state: the largest `diff` between their logits at any step.
pub fn decode_two_slots(
    gpu: (&Model, &mut State),
    cpu: (&Model, &mut State),
    diff: fn(&[f32], &[f32]) -> f32,
) -> f32 {
    let ((g, st), (model, cpu_st)) = (gpu, cpu);
    let mut worst = 0f32;
    for t in 0..3u32 {
        let (x, y) = ([t + 1], [t + 2]);
        let step = [
            SeqInput {
                slot: 0,
                tokens: &x,
            },
            SeqInput {
                slot: 1,
                tokens: &y,
            },
        ];
        let got = g.forward(st, &step, Logits::Last).unwrap().to_vec();
        let want = model.forward(cpu_st, &step, Logits::Last).unwrap();
        worst = worst.max(diff(&got, want));
    }
    worst
}

/// How long [`EveryCommand::run`]'s generations are.
pub struct Lengths {
    /// Tokens each prompt generates, greedy and sampled.
    pub new_tokens: usize,
    /// Tokens beam search generates.
    pub beam_tokens: usize,
    pub beams: usize,
}

/// Every consumer of a model, on one model: what the `every_command` tests compare between the CPU
/// and a GPU.
pub struct EveryCommand {
    /// Greedy, then seeded top-k sampling, of a batch of three prompts (streamed).
    pub generated: [Vec<Generation>; 2],
    /// The events each of those streamed.
    pub events: [usize; 2],
    /// Beam search of the second prompt, two sequences returned.
    pub beams: Vec<Generation>,
    /// The 5 likeliest next tokens after the second prompt.
    pub top: Vec<u32>,
    /// Log-probs of 64 tokens of a text (the fixture's whole context).
    pub score: Vec<f32>,
    /// Diagnostics of the same 64 tokens.
    pub diagnostics: Diagnostics,
    /// Strided perplexity of the whole text: windows of 64 advanced by 32, 3 at a time.
    pub perplexity: Perplexity,
}

impl EveryCommand {
    /// Every consumer on `cpu`, then on `gpu`, with GPT-2's tokenizer; both models must have 64
    /// positions at least.
    pub fn both(cpu: &Model, gpu: &Model, lengths: &Lengths) -> (EveryCommand, EveryCommand) {
        let tok = Tokenizer::gpt2();
        (
            EveryCommand::run(cpu, &tok, lengths),
            EveryCommand::run(gpu, &tok, lengths),
        )
    }

    /// Every consumer on `m`, which must have 64 positions at least.
    pub fn run(m: &Model, tok: &Tokenizer, lengths: &Lengths) -> EveryCommand {
        let prompts: Vec<Vec<u32>> = ["Hello", "The tower has three levels", "In 1957"]
            .iter()
            .map(|p| tok.encode(p))
            .collect();
        let generate = |sampling| {
            let cfg = GenerationConfig {
                max_new_tokens: lengths.new_tokens,
                sampling,
                ..Default::default()
            };
            let mut events = 0;
            let out = Generator::new(m, tok, &prompts, &cfg)
                .unwrap()
                .run(|_| events += 1)
                .unwrap();
            (out, events)
        };
        let (greedy, greedy_events) = generate(SamplingParams::greedy());
        let (sampled, sampled_events) = generate(SamplingParams {
            temperature: 0.8,
            top_k: 40,
            seed: 5,
            ..Default::default()
        });
        let beams = GenerationConfig {
            max_new_tokens: lengths.beam_tokens,
            num_beams: lengths.beams,
            num_return_sequences: 2,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        };
        let text = tok.encode(&"The quick brown fox jumps over the lazy dog. ".repeat(12));
        EveryCommand {
            generated: [greedy, sampled],
            events: [greedy_events, sampled_events],
            beams: beam_search(m, tok, &prompts[1], &beams).unwrap(),
            top: gpt2::eval::top_k(m, &prompts[1], 5)
                .unwrap()
                .iter()
                .map(|t| t.0)
                .collect(),
            score: gpt2::eval::score(m, &text[..64]).unwrap(),
            diagnostics: gpt2::eval::score_diagnostics(m, &[text[..64].to_vec()])
                .unwrap()
                .remove(0),
            perplexity: gpt2::eval::perplexity(m, &text, 64, 32, 3, |_, _| {}).unwrap(),
        }
    }

    /// `self` and `other` chose alike: the same generated tokens and text, the same beams and top
    /// tokens, and perplexities within 1e-4 of each other over the same tokens. (The log-probs are
    /// each test's to compare, with its own tolerance.)
    pub fn assert_same_choices(&self, other: &EveryCommand) {
        for (mine, theirs) in self.generated.iter().zip(&other.generated) {
            for (a, b) in mine.iter().zip(theirs) {
                assert_eq!((&a.tokens, &a.text), (&b.tokens, &b.text));
            }
        }
        for (a, b) in self.beams.iter().zip(&other.beams) {
            assert_eq!(a.tokens, b.tokens);
        }
        assert_eq!(self.top, other.top);
        let (pa, pb) = (&self.perplexity, &other.perplexity);
        assert_eq!(pa.scored, pb.scored);
        assert!(
            (pa.perplexity / pb.perplexity - 1.0).abs() < 1e-4,
            "{pa:?} {pb:?}"
        );
    }
}
