//! A [`Chain`] served by `fractal chain serve`, reached over HTTP.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fractal_http::SignedClient;
use fractal_protocol::{Hotkey, Keypair, ManifestId, ModelManifest, ModelSchedule, Upgrade};
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::server::{
    AddStakeCall, BalanceReply, BlockReply, ChainErrorBody, ChainInfo, Done, PublishReply,
    RegisterCall, RegisterReply, ScheduleReply, SetWeightsCall,
};
use crate::{AxonInfo, BlockNumber, Chain, ChainError, Hyperparams, Metagraph, Rao, Uid};

pub struct RemoteChain {
    base: Url,
    http: reqwest::Client,
    node: Hotkey,
    /// One signing client per key, so each key's nonces stay strictly increasing.
    signers: Mutex<BTreeMap<Hotkey, SignedClient>>,
}

fn transport(e: impl std::fmt::Display) -> ChainError {
    ChainError::Transport(e.to_string())
}

impl RemoteChain {
    /// Connects to `base` (e.g. `http://127.0.0.1:9944`) and learns the
    /// node key that write requests are addressed to.
    pub async fn connect(base: &str) -> Result<Self, ChainError> {
        let base = Url::parse(base)
            .map_err(|e| ChainError::Invalid(format!("chain url {base:?}: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(transport)?;
        let mut chain = RemoteChain {
            base,
            http,
            node: Hotkey([0; 32]),
            signers: Mutex::new(BTreeMap::new()),
        };
        chain.node = chain.info().await?.node;
        Ok(chain)
    }

    pub async fn info(&self) -> Result<ChainInfo, ChainError> {
        self.get("/v1/chain/info").await
    }

    fn url(&self, path: &str) -> Result<Url, ChainError> {
        self.base
            .join(path)
            .map_err(|e| ChainError::Invalid(e.to_string()))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ChainError> {
        let resp = self
            .http
            .get(self.url(path)?)
            .send()
            .await
            .map_err(transport)?;
        decode(resp).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        signer: &Keypair,
        path: &str,
        body: &B,
    ) -> Result<T, ChainError> {
        let client = {
            let mut signers = self
                .signers
                .lock()
                .map_err(|_| transport("signer cache poisoned"))?;
            signers
                .entry(signer.hotkey())
                .or_insert_with(|| SignedClient::new(self.http.clone(), Arc::new(signer.clone())))
                .clone()
        };
        let resp = client
            .post_json(self.url(path)?, &self.node, body)
            .await
            .map_err(transport)?;
        decode(resp).await
    }
}

/// Decodes the success body, or turns an error body back into the
/// [`ChainError`] the server raised.
async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ChainError> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(transport)?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .map_err(|e| transport(format!("bad reply from chain: {e}")));
    }
    Err(match serde_json::from_slice::<ChainErrorBody>(&bytes) {
        Ok(ChainErrorBody {
            chain_error: Some(e),
            ..
        }) => e,
        Ok(body) if status.is_client_error() => {
            ChainError::Invalid(format!("{} ({})", body.error.message, body.error.code))
        }
        Ok(body) => transport(format!("HTTP {status}: {}", body.error.message)),
        Err(_) => transport(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        )),
    })
}

#[async_trait]
impl Chain for RemoteChain {
    async fn block(&self) -> Result<BlockNumber, ChainError> {
        Ok(self.get::<BlockReply>("/v1/chain/block").await?.block)
    }

    async fn wait_for_block_after(
        &self,
        block: BlockNumber,
        timeout: Duration,
    ) -> Result<BlockNumber, ChainError> {
        let path = format!(
            "/v1/chain/block?after={block}&timeout_ms={}",
            timeout.as_millis()
        );
        Ok(self.get::<BlockReply>(&path).await?.block)
    }

    async fn hyperparams(&self) -> Result<Hyperparams, ChainError> {
        Ok(self.info().await?.hyperparams)
    }

    async fn metagraph(&self) -> Result<Metagraph, ChainError> {
        self.get("/v1/chain/metagraph").await
    }

    async fn register(&self, coldkey: &Keypair, hotkey: &Hotkey) -> Result<Uid, ChainError> {
        let reply: RegisterReply = self
            .post(
                coldkey,
                "/v1/chain/register",
                &RegisterCall { hotkey: *hotkey },
            )
            .await?;
        Ok(reply.uid)
    }

    async fn serve_axon(&self, hotkey: &Keypair, axon: AxonInfo) -> Result<(), ChainError> {
        self.post::<_, Done>(hotkey, "/v1/chain/serve_axon", &axon)
            .await
            .map(drop)
    }

    async fn set_weights(
        &self,
        hotkey: &Keypair,
        weights: &[(Uid, u16)],
        version_key: u64,
    ) -> Result<(), ChainError> {
        let call = SetWeightsCall {
            weights: weights.to_vec(),
            version_key,
        };
        self.post::<_, Done>(hotkey, "/v1/chain/set_weights", &call)
            .await
            .map(drop)
    }

    async fn add_stake(
        &self,
        coldkey: &Keypair,
        hotkey: &Hotkey,
        amount: Rao,
    ) -> Result<(), ChainError> {
        let call = AddStakeCall {
            hotkey: *hotkey,
            amount,
        };
        self.post::<_, Done>(coldkey, "/v1/chain/add_stake", &call)
            .await
            .map(drop)
    }

    async fn balance(&self, coldkey: &Hotkey) -> Result<Rao, ChainError> {
        let reply: BalanceReply = self.get(&format!("/v1/chain/balance/{coldkey}")).await?;
        Ok(reply.balance)
    }

    async fn model_schedule(&self) -> Result<ModelSchedule, ChainError> {
        let reply: ScheduleReply = self.get("/v1/chain/schedule").await?;
        reply
            .schedule
            .validate()
            .map_err(|e| transport(format!("chain sent a bad schedule: {e}")))?;
        Ok(reply.schedule)
    }

    async fn manifest(&self, id: &ManifestId) -> Result<Option<ModelManifest>, ChainError> {
        let resp = self
            .http
            .get(self.url(&format!("/v1/chain/manifests/{id}"))?)
            .send()
            .await
            .map_err(transport)?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let m: ModelManifest = decode(resp).await?;
        // Content-addressed: whatever carried it, it must hash to `id`.
        if m.id() != *id {
            return Err(transport(format!(
                "chain answered manifest {id} with one that hashes to {}",
                m.id()
            )));
        }
        m.validate()
            .map_err(|e| transport(format!("chain sent a bad manifest: {e}")))?;
        Ok(Some(m))
    }

    async fn publish_manifest(
        &self,
        owner: &Keypair,
        manifest: &ModelManifest,
    ) -> Result<ManifestId, ChainError> {
        let reply: PublishReply = self
            .post(owner, "/v1/chain/publish_manifest", manifest)
            .await?;
        Ok(reply.manifest_id)
    }

    async fn schedule_upgrade(
        &self,
        owner: &Keypair,
        up: Upgrade,
    ) -> Result<ModelSchedule, ChainError> {
        self.post(owner, "/v1/chain/schedule_upgrade", &up).await
    }
}
