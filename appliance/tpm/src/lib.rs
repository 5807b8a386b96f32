//! The box's TPM 2.0, through tss-esapi 7 (the maintained binding; it builds
//! against Debian 12's libtss2 3.2.1).
//!
//! - A **storage primary key** (ECC P-256, restricted decryption) is derived
//!   from the owner hierarchy's seed at every start: the same template gives
//!   the same key on the same TPM, so nothing needs a persistent handle.
//!   A reset or replaced TPM has a new seed, so everything made under the
//!   old primary stops loading — which is how a reset is detected.
//! - The **device identity** is an ECC P-256 ECDSA/SHA-256 signing key
//!   created under the primary with `fixedTPM | fixedParent |
//!   sensitiveDataOrigin`: it is generated inside the TPM and cannot be
//!   duplicated or exported. Its public part and TPM-encrypted private part
//!   are kept as a blob file and loaded at start.
//! - **Sealed secrets** (the WireGuard key, the spool's data key) are keyed-
//!   hash objects under the primary: blobs that only this TPM can unseal.
//!
//! Commands that carry a secret — sealing one (TPM2_Create) and unsealing
//! it — run in a session salted to the storage primary with parameter
//! encryption both ways, so the WireGuard and spool keys never cross the
//! TPM's bus in clear (a bus sniffer on a stolen box sees AES-CFB
//! ciphertext under a session key it cannot derive). Every other command
//! (loading, signing, policies) runs with one password session set once:
//! nothing secret passes there. Transient objects and sessions are flushed
//! after use: without a resource manager (swtpm) the TPM has only three
//! slots.

#![forbid(unsafe_code)]

pub mod csr;
mod der;
pub mod keystore;

pub use keystore::KeyStore;

use std::path::Path;
use std::str::FromStr;

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyDerivationFunctionScheme,
    KeyedHashScheme, PcrSelectionList, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, Signature,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;
use zeroize::Zeroizing;

const BLOB_MAGIC: &[u8; 4] = b"KKTB";
/// 1: public, private. 2: public, private, PCR list. 3: as 2, made under
/// the noDA storage primary (1 and 2 are under the DA-protected one).
const BLOB_VERSION: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("cannot reach the TPM at {tcti}: {message}")]
    Unreachable { tcti: String, message: String },
    #[error("{what} in {path} does not load on this TPM: the TPM was reset, cleared or replaced since the box was provisioned ({message})")]
    Foreign {
        what: String,
        path: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Blob { path: String, message: String },
    #[error("{what} in {path} is refused by the TPM's dictionary-attack lockout ({message}): it was made by a version before blob format 3 (DA-protected), and the TPM counts each power cut; it clears by itself after the TPM's recovery time, then `kakehashi provision --rotate` (once the spool is empty) makes keys that are not subject to it")]
    Lockout {
        what: String,
        path: String,
        message: String,
    },
    #[error("{what} in {path} is bound to PCRs {pcrs:?} and they no longer hold the values it was sealed with: the firmware, boot loader or their settings changed since provisioning ({message})")]
    Policy {
        what: String,
        path: String,
        pcrs: Vec<u8>,
        message: String,
    },
    #[error("TPM {operation} failed: {message}")]
    Command { operation: String, message: String },
}

fn command(operation: &str) -> impl Fn(tss_esapi::Error) -> TpmError + '_ {
    move |e| TpmError::Command {
        operation: operation.to_string(),
        message: e.to_string(),
    }
}

/// A TPM object as stored on disk: its public area and its private area,
/// encrypted by the TPM under the storage primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBlob {
    pub public: Vec<u8>,
    pub private: Vec<u8>,
    /// PCRs (SHA-256 bank) the object's policy binds it to; empty: none.
    pub pcrs: Vec<u8>,
    /// Made before blob version 3: under the DA-protected storage primary,
    /// itself DA-protected. Such a key is locked out by the TPM after a few
    /// power cuts (see [`primary_template`]); it still loads, and
    /// `kakehashi selftest` says so.
    pub legacy: bool,
}

impl KeyBlob {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.public.len() + self.private.len());
        out.extend_from_slice(BLOB_MAGIC);
        out.push(if self.legacy { 2 } else { BLOB_VERSION });
        for part in [&self.public, &self.private, &self.pcrs] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<KeyBlob> {
        let rest = bytes.strip_prefix(BLOB_MAGIC.as_slice())?;
        let (&version, mut rest) = rest.split_first()?;
        let count = match version {
            1 => 2,
            2 | 3 => 3,
            _ => return None,
        };
        let mut parts = Vec::new();
        for _ in 0..count {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            parts.push(rest.get(4..4 + len)?.to_vec());
            rest = &rest[4 + len..];
        }
        if !rest.is_empty() {
            return None;
        }
        let pcrs = if count == 3 { parts.pop()? } else { Vec::new() };
        let private = parts.pop()?;
        let public = parts.pop()?;
        Some(KeyBlob {
            public,
            private,
            pcrs,
            legacy: version < 3,
        })
    }

    /// The public part as a TPM2B_PUBLIC (what `tpm2_load -u` reads).
    pub fn tpm2b_public(&self) -> Vec<u8> {
        let mut out = (self.public.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&self.public);
        out
    }

    /// The private part as a TPM2B_PRIVATE (what `tpm2_load -r` reads).
    pub fn tpm2b_private(&self) -> Vec<u8> {
        let mut out = (self.private.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&self.private);
        out
    }

    pub fn read(path: &Path) -> Result<KeyBlob, TpmError> {
        let bytes = std::fs::read(path).map_err(|e| TpmError::Blob {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        KeyBlob::decode(&bytes).ok_or_else(|| TpmError::Blob {
            path: path.display().to_string(),
            message: "not a Kakehashi TPM blob (damaged, or written by a newer version)".into(),
        })
    }
}

/// An uncompressed P-256 point (0x04 ‖ X ‖ Y), as SubjectPublicKeyInfo carries it.
pub type EcPoint = [u8; 65];

/// An open TPM with the storage primary loaded.
pub struct Tpm {
    context: Context,
    primary: KeyHandle,
    /// The pre-noDA primary, made when a legacy blob is loaded.
    legacy_primary: Option<KeyHandle>,
    tcti: String,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("tcti", &self.tcti)
            .finish_non_exhaustive()
    }
}

/// An ECC P-256 object with SHA-256 names and the given attributes and parameters.
fn ecc_template(
    attributes: ObjectAttributesBuilder,
    parameters: PublicEccParametersBuilder,
) -> Result<Public, tss_esapi::Error> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes.build()?)
        .with_ecc_parameters(parameters.build()?)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Generated inside the TPM, bound to it and to its parent; not subject to
/// dictionary-attack protection (noDA), as every object of ours.
fn resident_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
}

/// The storage primary. noDA: a TPM that loses power without
/// TPM2_Shutdown counts one dictionary-attack failure at its next start if
/// a DA-protected object was used, and after `maxTries` such power cuts (3
/// on swtpm) refuses every DA-protected object for `recoveryTime` (1000 s):
/// a box whose power is cut would stop relaying. Our objects have empty
/// passwords, nothing to guess, so DA protection guards nothing. (Found by
/// the image's power-cut test: the box rejected associations after the
/// third cut.)
fn primary_template() -> Result<Public, tss_esapi::Error> {
    primary_template_with(true)
}

/// `no_da = false`: the primary of blob versions 1 and 2.
fn primary_template_with(no_da: bool) -> Result<Public, tss_esapi::Error> {
    ecc_template(
        resident_attributes()
            .with_no_da(no_da)
            .with_decrypt(true)
            .with_restricted(true),
        PublicEccParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            EccCurve::NistP256,
        ),
    )
}

fn identity_template() -> Result<Public, tss_esapi::Error> {
    ecc_template(
        resident_attributes().with_sign_encrypt(true),
        PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(true)
            .with_is_decryption_key(false)
            .with_restricted(false)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null),
    )
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList, tss_esapi::Error> {
    let slots = pcrs
        .iter()
        .map(|&p| PcrSlot::try_from(1u32 << u32::from(p.min(31))))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
}

/// `policy`: a PolicyPCR digest, so only that boot state unseals it;
/// `None`: the object's password (empty) is enough.
fn sealed_template(policy: Option<Digest>) -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(policy.is_none())
        .with_no_da(true)
        .build()?;
    let builder = match policy {
        Some(p) => PublicBuilder::new().with_auth_policy(p),
        None => PublicBuilder::new(),
    };
    builder
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

impl Tpm {
    /// Opens the TPM named by a TCTI string (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`) and derives the storage primary.
    pub fn open(tcti: &str) -> Result<Tpm, TpmError> {
        let unreachable = |message: String| TpmError::Unreachable {
            tcti: tcti.to_string(),
            message,
        };
        let conf = TctiNameConf::from_str(tcti).map_err(|e| unreachable(e.to_string()))?;
        let mut context = Context::new(conf).map_err(|e| unreachable(e.to_string()))?;
        context.set_sessions((Some(AuthSession::Password), None, None));
        let template = primary_template().map_err(command("primary template"))?;
        let primary = context
            .create_primary(Hierarchy::Owner, template, None, None, None, None)
            .map_err(|e| unreachable(format!("creating the storage primary key: {e}")))?
            .key_handle;
        Ok(Tpm {
            context,
            primary,
            legacy_primary: None,
            tcti: tcti.to_string(),
        })
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// `n` random bytes from the TPM's generator; they become keys, so they
    /// come back encrypted on the bus (see [`Tpm::encrypted_session`]).
    pub fn random(&mut self, n: usize) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let session = self.encrypted_session(SessionType::Hmac)?;
        let mut out = Zeroizing::new(Vec::with_capacity(n));
        let mut result = Ok(());
        while out.len() < n {
            let want = (n - out.len()).min(32);
            match self
                .context
                .execute_with_session(Some(session), |c| c.get_random(want))
            {
                Ok(chunk) => out.extend_from_slice(chunk.value()),
                Err(e) => {
                    result = Err(command("GetRandom")(e));
                    break;
                }
            }
        }
        self.end_session(session);
        result.map(|()| out)
    }

    fn create(
        &mut self,
        template: Public,
        data: Option<SensitiveData>,
    ) -> Result<KeyBlob, TpmError> {
        let created = self
            .context
            .create(self.primary, template, None, data, None, None)
            .map_err(command("Create"))?;
        Ok(KeyBlob {
            public: created.out_public.marshall().map_err(command("marshal"))?,
            private: created.out_private.value().to_vec(),
            pcrs: Vec::new(),
            legacy: false,
        })
    }

    fn load(&mut self, blob: &KeyBlob, what: &str, path: &str) -> Result<KeyHandle, TpmError> {
        let damaged = |message: String| TpmError::Blob {
            path: path.to_string(),
            message,
        };
        let public = Public::unmarshall(&blob.public).map_err(|e| damaged(e.to_string()))?;
        let private =
            Private::try_from(blob.private.clone()).map_err(|e| damaged(e.to_string()))?;
        let parent = if blob.legacy {
            self.legacy_primary()?
        } else {
            self.primary
        };
        self.context.load(parent, private, public).map_err(|e| {
            let message = e.to_string();
            if message.contains("DA lockout") {
                TpmError::Lockout {
                    what: what.to_string(),
                    path: path.to_string(),
                    message,
                }
            } else {
                TpmError::Foreign {
                    what: what.to_string(),
                    path: path.to_string(),
                    message,
                }
            }
        })
    }

    /// The storage primary of blob versions 1 and 2, made when needed.
    fn legacy_primary(&mut self) -> Result<KeyHandle, TpmError> {
        if let Some(p) = self.legacy_primary {
            return Ok(p);
        }
        let template = primary_template_with(false).map_err(command("primary template"))?;
        let p = self
            .context
            .create_primary(Hierarchy::Owner, template, None, None, None, None)
            .map_err(command("CreatePrimary (the pre-noDA primary)"))?
            .key_handle;
        self.legacy_primary = Some(p);
        Ok(p)
    }

    fn flush(&mut self, handle: KeyHandle) {
        let _ = self.context.flush_context(handle.into());
    }

    /// Creates a new device identity key inside the TPM.
    pub fn create_identity(&mut self) -> Result<KeyBlob, TpmError> {
        let template = identity_template().map_err(command("identity template"))?;
        self.create(template, None)
    }

    /// The identity's public key, from its blob (no TPM needed).
    pub fn identity_point(blob: &KeyBlob) -> Option<EcPoint> {
        let public = Public::unmarshall(&blob.public).ok()?;
        let Public::Ecc { unique, .. } = public else {
            return None;
        };
        let (x, y) = (unique.x().value(), unique.y().value());
        if x.len() > 32 || y.len() > 32 {
            return None;
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[1 + 32 - x.len()..33].copy_from_slice(x);
        point[33 + 32 - y.len()..].copy_from_slice(y);
        Some(point)
    }

    /// Signs a SHA-256 digest with the identity key; DER ECDSA-Sig-Value.
    pub fn sign(
        &mut self,
        identity: &KeyBlob,
        path: &str,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, TpmError> {
        let key = self.load(identity, "the box identity key", path)?;
        let result = (|| {
            let ticket = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                tag: TPM2_ST_HASHCHECK,
                hierarchy: TPM2_RH_NULL,
                digest: Default::default(),
            })
            .map_err(command("hash ticket"))?;
            let digest = Digest::try_from(digest.to_vec()).map_err(command("digest"))?;
            let signature = self
                .context
                .sign(key, digest, SignatureScheme::Null, ticket)
                .map_err(command("Sign"))?;
            match signature {
                Signature::EcDsa(s) => Ok(der::ecdsa_signature(
                    s.signature_r().value(),
                    s.signature_s().value(),
                )),
                other => Err(TpmError::Command {
                    operation: "Sign".into(),
                    message: format!("unexpected signature kind {other:?}"),
                }),
            }
        })();
        self.flush(key);
        result
    }

    /// A session salted to the storage primary (its key comes from a secret
    /// only this TPM can decrypt) with parameter encryption both ways:
    /// secrets travel between host and TPM encrypted with AES-128-CFB
    /// under that session key, never in clear on the bus.
    fn encrypted_session(&mut self, kind: SessionType) -> Result<AuthSession, TpmError> {
        let primary = self.primary;
        self.context.execute_without_session(|c| {
            let session = c
                .start_auth_session(
                    Some(primary),
                    None,
                    None,
                    kind,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(command("StartAuthSession (salted)"))?
                .ok_or_else(|| TpmError::Command {
                    operation: "StartAuthSession".into(),
                    message: "no session returned".into(),
                })?;
            let (attributes, mask) = SessionAttributesBuilder::new()
                .with_decrypt(true)
                .with_encrypt(true)
                .with_continue_session(true)
                .build();
            c.tr_sess_set_attributes(session, attributes, mask)
                .map_err(command("session attributes"))?;
            Ok(session)
        })
    }

    /// A session satisfying PolicyPCR over `pcrs` with their current values
    /// (`trial`: only to compute the policy digest). A real one is salted
    /// and encrypts parameters (see [`Tpm::encrypted_session`]).
    fn pcr_session(&mut self, pcrs: &[u8], trial: bool) -> Result<AuthSession, TpmError> {
        let selection = pcr_selection(pcrs).map_err(command("PCR selection"))?;
        let session = if trial {
            self.context.execute_without_session(|c| {
                c.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Trial,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
                .map_err(command("StartAuthSession"))?
                .ok_or_else(|| TpmError::Command {
                    operation: "StartAuthSession".into(),
                    message: "no session returned".into(),
                })
            })?
        } else {
            self.encrypted_session(SessionType::Policy)?
        };
        let applied = PolicySession::try_from(session)
            .map_err(command("policy session"))
            .and_then(|policy| {
                self.context
                    .execute_without_session(|c| c.policy_pcr(policy, Digest::default(), selection))
                    .map_err(command("PolicyPCR"))
            });
        match applied {
            Ok(()) => Ok(session),
            Err(e) => {
                self.end_session(session);
                Err(e)
            }
        }
    }

    fn end_session(&mut self, session: AuthSession) {
        let handle = tss_esapi::handles::SessionHandle::from(session);
        let _ = self.context.flush_context(handle.into());
    }

    /// Seals `secret` (at most 128 bytes) to this TPM; with `pcrs`, only
    /// while those PCRs (SHA-256 bank) hold the values they hold now.
    pub fn seal(&mut self, secret: &[u8], pcrs: &[u8]) -> Result<KeyBlob, TpmError> {
        let data = SensitiveData::try_from(secret.to_vec()).map_err(command("seal data"))?;
        let policy = if pcrs.is_empty() {
            None
        } else {
            let session = self.pcr_session(pcrs, true)?;
            let digest = PolicySession::try_from(session)
                .map_err(command("policy session"))
                .and_then(|p| {
                    self.context
                        .execute_without_session(|c| c.policy_get_digest(p))
                        .map_err(command("PolicyGetDigest"))
                });
            self.end_session(session);
            Some(digest?)
        };
        let template = sealed_template(policy).map_err(command("seal template"))?;
        // The secret goes to the TPM encrypted (TPM2_Create's first
        // parameter, under an encrypting session that also authorizes the
        // primary).
        let session = self.encrypted_session(SessionType::Hmac)?;
        let primary = self.primary;
        let created = self
            .context
            .execute_with_session(Some(session), |c| {
                c.create(primary, template, None, Some(data), None, None)
            })
            .map_err(command("Create"));
        self.end_session(session);
        let created = created?;
        let mut blob = KeyBlob {
            public: created.out_public.marshall().map_err(command("marshal"))?,
            private: created.out_private.value().to_vec(),
            pcrs: Vec::new(),
            legacy: false,
        };
        blob.pcrs = pcrs.to_vec();
        Ok(blob)
    }

    /// A blob as versions before 3 sealed it (under the DA-protected
    /// primary, no noDA): for the tests that prove such blobs still load.
    #[doc(hidden)]
    pub fn seal_as_version_2(&mut self, secret: &[u8]) -> Result<KeyBlob, TpmError> {
        let mut blob = KeyBlob {
            public: Vec::new(),
            private: Vec::new(),
            pcrs: Vec::new(),
            legacy: true,
        };
        let parent = self.legacy_primary()?;
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_user_with_auth(true)
            .build()
            .map_err(command("attributes"))?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(command("template"))?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(command("data"))?;
        let created = self
            .context
            .create(parent, template, None, Some(data), None, None)
            .map_err(command("Create"))?;
        blob.public = created.out_public.marshall().map_err(command("marshal"))?;
        blob.private = created.out_private.value().to_vec();
        Ok(blob)
    }

    /// Unseals a blob made by [`Tpm::seal`] on this TPM. The secret comes
    /// back encrypted on the bus (a salted session with response parameter
    /// encryption), so sniffing the TPM's bus on a stolen box shows nothing;
    /// with PCRs, the policy session itself is that session.
    pub fn unseal(
        &mut self,
        blob: &KeyBlob,
        what: &str,
        path: &str,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let handle = self.load(blob, what, path)?;
        let session = if blob.pcrs.is_empty() {
            self.encrypted_session(SessionType::Hmac)
        } else {
            self.pcr_session(&blob.pcrs, false)
        };
        let result = session.and_then(|session| {
            let r = self
                .context
                .execute_with_session(Some(session), |c| c.unseal(handle.into()))
                .map(|d| Zeroizing::new(d.value().to_vec()))
                .map_err(|e| {
                    if blob.pcrs.is_empty() {
                        command("Unseal")(e)
                    } else {
                        TpmError::Policy {
                            what: what.to_string(),
                            path: path.to_string(),
                            pcrs: blob.pcrs.clone(),
                            message: e.to_string(),
                        }
                    }
                });
            self.end_session(session);
            r
        });
        self.flush(handle);
        result
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        let _ = self.context.flush_context(self.primary.into());
        if let Some(p) = self.legacy_primary {
            let _ = self.context.flush_context(p.into());
        }
    }
}

/// SHA-256, for callers that sign.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}
