//! What the gateway's tests share: the tiny model and a gateway serving on
//! loopback with one API key.
#![allow(dead_code)]

use std::sync::Arc;

use fractal_engine::{builtin::tiny, pipelines::text_to_video_sd::Model, PinnedModel, TinyVariant};
use fractal_gateway::db::KeyLimits;
use fractal_gateway::Gateway;

pub fn tiny_model() -> PinnedModel {
    PinnedModel::from_parts(
        tiny::manifest(TinyVariant::Base),
        Model::tiny(TinyVariant::Base, &candle_core::Device::Cpu).unwrap(),
    )
    .unwrap()
}

pub struct Running {
    pub base: String,
    pub key: String,
    pub gw: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Creates a video with `body` and returns its id.
    pub async fn create(&self, body: serde_json::Value) -> String {
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/videos", self.base))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Serves `gw` on a loopback port with a new API key of `limits`.
pub async fn serve(gw: Arc<Gateway>, limits: KeyLimits) -> Running {
    let key = gw.db.create_key("test", limits).unwrap().1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(fractal_gateway::serve(listener, gw.clone(), async {
        let _ = rx.await;
    }));
    Running {
        base,
        key,
        gw,
        stop: Some(tx),
        task,
    }
}
