//! Scripting a partition around your own workload with the simulator's library.
//!
//! Three real Verge nodes run in a deterministic simulation. Node `n2` is cut off; a shopping
//! cart gets apples on both sides of the cut; the partition heals; every node must end up with
//! the same cart holding all five apples. Run it with a seed, and the same seed replays the
//! same run to the last packet:
//!
//! ```text
//! cargo run -p verge-sim --example partition -- 42
//! ```

use std::time::Duration;

use serde_json::json;
use verge_sim::Cluster;
use verge_sim::api::NodeApi;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 42,
    };
    let mut cluster = Cluster::builder()
        .nodes(3)
        .seed(seed)
        .latency(Duration::from_millis(20))
        .build()?;
    // Let the nodes find each other.
    cluster.run_for(Duration::from_secs(3))?;

    cluster.partition(&[2], &[0, 1]);
    cluster.client("shopper-a", async {
        let ops = json!([{ "op": "inc", "path": ["apples"], "by": 2 }]);
        let answer = NodeApi::of("n0").patch("cart/42", ops).await?;
        assert!(
            answer.status.is_success(),
            "n0 accepts writes during the partition"
        );
        Ok(())
    });
    cluster.client("shopper-b", async {
        let ops = json!([{ "op": "inc", "path": ["apples"], "by": 3 }]);
        let answer = NodeApi::of("n2").patch("cart/42", ops).await?;
        assert!(
            answer.status.is_success(),
            "n2 accepts writes while cut off"
        );
        Ok(())
    });
    cluster.run_clients(Duration::from_secs(10))?;

    cluster.heal();
    let state = cluster.converge(&["cart/42"], Duration::from_secs(30))?;
    if !state.converged {
        return Err(format!("the replicas did not converge (seed {seed})").into());
    }
    for (i, node) in state.nodes.iter().enumerate() {
        let cart = node
            .get("cart/42")
            .and_then(Option::as_ref)
            .map(|v| v.doc.clone())
            .unwrap_or_default();
        println!("n{i}: {cart}");
        if cart["apples"].as_i64() != Some(5) {
            return Err(format!("n{i} lost apples (seed {seed})").into());
        }
    }
    println!("converged after {:?} of simulated time", state.took);
    println!("trace: {}", cluster.trace().hash());
    Ok(())
}
