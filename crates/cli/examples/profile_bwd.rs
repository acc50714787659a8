use candle_core::{Device, Tensor};
use safegeo_runtime::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let p = fetch::ensure(&fetch::SMOLLM2, false)?;
    let mut m = load_model(&p, &Device::Cpu)?;
    let _vars = m.make_trainable()?;
    let ids: Vec<u32> = (0..257).map(|i| 100 + (i * 7919) % 40000).collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    for _ in 0..3 {
        let t0 = Instant::now();
        let x = m.embed_ids(&ids.narrow(1, 0, 256)?)?;
        let h = m.forward_embeds(
            x.clone(),
            &Layout::dense(1),
            None,
            LogitsAt::None,
            Phase::Prompt,
            true,
            &mut NoHooks,
        )?;
        let _ = h;
        let t1 = Instant::now();
        let logits = m
            .forward_embeds(
                x,
                &Layout::dense(1),
                None,
                LogitsAt::All,
                Phase::Prompt,
                true,
                &mut NoHooks,
            )?
            .unwrap();
        let t2 = Instant::now();
        let loss = candle_nn::loss::cross_entropy(
            &logits.flatten_to(1)?,
            &ids.narrow(1, 1, 256)?.flatten_all()?,
        )?;
        let t3 = Instant::now();
        let _g = loss.backward()?;
        let t4 = Instant::now();
        println!(
            "body fwd {:.3}s  body+head fwd {:.3}s  ce {:.3}s  backward {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64()
        );
    }
    Ok(())
}
