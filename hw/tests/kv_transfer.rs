//! SmolLM2-135M (the real GGUF): prompts prefilled together in one instance, their KV exported
//! and imported into another that already holds other sequences, then decoded together there,
//! give exactly the tokens of an uninterrupted run.

use hw::paged::{PagedModel, SeqId};
use models::runtime::{ChatMessage, Device, GgufFile, Model, Tensor, TensorDType, test_gguf_path};

fn argmax(logits: &Tensor, row: usize) -> u32 {
    models::runtime::argmax(&logits.get(row).unwrap().to_vec1::<f32>().unwrap())
}

/// Greedy decoding of `ids` together for `steps` tokens after their first; returns each
/// sequence's tokens after the first.
fn decode_together(m: &mut PagedModel, ids: &[SeqId], steps: usize) -> Vec<Vec<u32>> {
    let work: Vec<(SeqId, usize)> = ids.iter().map(|&id| (id, 1)).collect();
    let mut out = vec![Vec::new(); ids.len()];
    for _ in 0..steps {
        let logits = m.step(&work).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let t = argmax(&logits, i);
            out[i].push(t);
            m.push_token(id, t).unwrap();
        }
    }
    out
}

#[test]
fn exported_kv_continues_exactly_on_another_instance() {
    let gguf = GgufFile::open(&test_gguf_path().unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let tokenizer = gguf.tokenizer().unwrap();
    let model = Model::new(gguf.weights(TensorDType::F32, &Device::Cpu).unwrap()).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain in one sentence why the sky is blue, for a child of five who asks a lot.",
    ]
    .iter()
    .map(|q| {
        let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", *q)], true);
        tokenizer.encode(&text, false).unwrap()
    })
    .collect();
    const STEPS: usize = 24;

    // Uninterrupted: prefill all three in one step, decode together.
    let mut whole = PagedModel::new(model.clone(), 64, 16, true).unwrap();
    let ids: Vec<SeqId> = prompts.iter().map(|p| whole.admit(p).unwrap().0).collect();
    let work: Vec<(SeqId, usize)> = ids.iter().map(|&id| (id, usize::MAX)).collect();
    let logits = whole.step(&work).unwrap();
    let firsts: Vec<u32> = (0..ids.len()).map(|i| argmax(&logits, i)).collect();
    for (&id, &t) in ids.iter().zip(&firsts) {
        whole.push_token(id, t).unwrap();
    }
    let expected = decode_together(&mut whole, &ids, STEPS);

    // Disaggregated: prefill in one instance (two in a batch, one alone), import elsewhere.
    let mut prefill = PagedModel::new(model.clone(), 64, 16, true).unwrap();
    let mut decode = PagedModel::new(model, 96, 16, true).unwrap();
    let resident = decode.admit(&prompts[2][..20]).unwrap().0;
    let p: Vec<SeqId> = prompts
        .iter()
        .map(|t| prefill.admit(t).unwrap().0)
        .collect();
    let logits = prefill
        .step(&[(p[0], usize::MAX), (p[1], usize::MAX)])
        .unwrap();
    let mut sampled = vec![argmax(&logits, 0), argmax(&logits, 1)];
    sampled.push(argmax(&prefill.step(&[(p[2], usize::MAX)]).unwrap(), 0));
    assert_eq!(sampled, firsts);
    let mut imported = Vec::new();
    for (&id, &t) in p.iter().zip(&sampled) {
        prefill.push_token(id, t).unwrap();
        let export = prefill.export(id, 0).unwrap();
        let kv_bytes = models::ModelSpec::preset("smollm2-135m")
            .unwrap()
            .kv_bytes_per_token(models::DType::F32) as usize;
        assert_eq!(export.payload_bytes(), export.blocks.len() * 16 * kv_bytes);
        imported.push(decode.import(&export).unwrap());
        prefill.release(id).unwrap();
    }
    let continued = decode_together(&mut decode, &imported, STEPS);
    assert_eq!(continued, expected);
    decode.release(resident).unwrap();
    let answer = tokenizer
        .decode(&[&[firsts[0]][..], &continued[0]].concat(), true)
        .unwrap();
    assert!(answer.contains("Paris"), "{answer}");
}
