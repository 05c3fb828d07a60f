//! Verification keys, each bound to exactly one algorithm, with the claim
//! rules (`exp` required, `nbf`, `iss`, `aud`, leeway) compiled into a
//! per-key [`jsonwebtoken::Validation`] whose only algorithm is the key's.

use std::fmt;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use crate::config::{JwtConfig, JwtKeyConfig, JwtKeyMaterial};

/// Longest clock-skew allowance honoured (larger configured values are clamped).
const MAX_LEEWAY_SECS: u64 = 86_400;

/// The claim checks shared by every key of one configuration.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules {
    issuer: Option<String>,
    audience: Vec<String>,
    leeway: u64,
}

impl ClaimRules {
    pub(crate) fn new(cfg: &JwtConfig) -> Self {
        ClaimRules {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway.as_secs().min(MAX_LEEWAY_SECS),
        }
    }

    /// A validation that accepts only `alg`.
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        let mut required = vec!["exp"];
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        v
    }
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// `callers.jwt.keys[i]`.
    Static(usize),
    /// The JWKS document.
    Jwks,
}

/// One usable verification key.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<Box<str>>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
    pub(crate) validation: Validation,
    pub(crate) source: KeySource,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// How the key is named in messages: `key \`rs1\`` or `key #0`.
    pub(crate) fn label(&self) -> String {
        match (&self.kid, self.source) {
            (Some(kid), _) => format!("key `{kid}`"),
            (None, KeySource::Static(i)) => format!("key callers.jwt.keys[{i}]"),
            (None, KeySource::Jwks) => "the JWKS key without a kid".to_owned(),
        }
    }

    /// Builds a configured key (material was checked by config validation).
    pub(crate) fn from_config(
        index: usize,
        k: &JwtKeyConfig,
        rules: &ClaimRules,
    ) -> Result<Self, String> {
        let path = format!("callers.jwt.keys[{index}]");
        let unusable =
            |e: jsonwebtoken::errors::Error| format!("{path}: unusable {:?} key: {e}", k.alg);
        let key = match &k.material {
            JwtKeyMaterial::PublicKeyPem(pem) => match k.alg.family() {
                AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem).map_err(unusable)?,
                AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem).map_err(unusable)?,
                AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem).map_err(unusable)?,
                AlgorithmFamily::Hmac => {
                    return Err(format!(
                        "{path}: {:?} needs a secret, not a public key",
                        k.alg
                    ));
                }
            },
            JwtKeyMaterial::Secret(secret) => {
                if k.alg.family() != AlgorithmFamily::Hmac {
                    return Err(format!(
                        "{path}: {:?} needs a public key, not a secret",
                        k.alg
                    ));
                }
                DecodingKey::from_secret(secret.expose().as_bytes()).map_err(unusable)?
            }
            JwtKeyMaterial::Jwk(text) => {
                let jwk: Jwk =
                    serde_json::from_str(text).map_err(|e| format!("{path}: not a JWK: {e}"))?;
                if let Some(declared) = jwk.common.key_algorithm
                    && declared != KeyAlgorithm::from(k.alg)
                {
                    return Err(format!(
                        "{path}: the JWK declares {declared} but the key is configured for {:?}",
                        k.alg
                    ));
                }
                DecodingKey::from_jwk(&jwk).map_err(unusable)?
            }
        };
        if key.family() != k.alg.family() {
            return Err(format!(
                "{path}: the key material does not fit algorithm {:?}",
                k.alg
            ));
        }
        Ok(VerifyKey {
            kid: k.kid.as_deref().map(Into::into),
            alg: k.alg,
            validation: rules.validation(k.alg),
            key,
            source: KeySource::Static(index),
        })
    }

    /// Builds a key from a JWKS entry. Keys for encryption, symmetric
    /// (`oct`) keys and keys whose algorithm cannot be determined are
    /// refused: a published key set only ever holds public signing keys.
    pub(crate) fn from_jwk(jwk: &Jwk, rules: &ClaimRules) -> Result<Self, String> {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Err("it is an encryption key (`use: enc`)".to_owned());
        }
        if let Some(ops) = &jwk.common.key_operations
            && !ops.iter().any(|o| matches!(o, KeyOperations::Verify))
        {
            return Err("its `key_ops` do not include `verify`".to_owned());
        }
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::OctetKey(_), _) => {
                return Err("symmetric (`oct`) keys are not accepted from a JWKS".to_owned());
            }
            (_, Some(declared)) => Algorithm::try_from(declared)
                .map_err(|_| format!("its algorithm {declared} cannot verify JWTs"))?,
            (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(p), None) => match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return Err("its curve is not supported".to_owned()),
            },
            (AlgorithmParameters::OctetKeyPair(p), None) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            _ => return Err("its key type or algorithm is not supported".to_owned()),
        };
        if matches!(
            jwk.common.key_algorithm,
            Some(KeyAlgorithm::UNKNOWN_ALGORITHM)
        ) {
            return Err("its algorithm is not supported".to_owned());
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key material: {e}"))?;
        if key.family() != alg.family() {
            return Err(format!("its key type does not fit its algorithm {alg:?}"));
        }
        Ok(VerifyKey {
            kid: jwk.common.key_id.as_deref().map(Into::into),
            alg,
            validation: rules.validation(alg),
            key,
            source: KeySource::Jwks,
        })
    }
}
