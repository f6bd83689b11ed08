//! caas-vsm-proto: the compact framed wire protocol between `libcaas_pkcs11.so` (the
//! PKCS#11 module inside the workload) and the tenant's crypto domain, which holds the keys.
//!
//! Sans-IO: [`frame`] splits a byte stream into frames, [`codec`] encodes and decodes the
//! [`messages`]. Each connection starts with [`Request::Hello`]; then the module sends
//! [`Request`]s and reads one [`Response`] per request, in the order of the requests (it may
//! send several before reading: the crypto domain answers a connection's requests in order). Everything decoded here came from a peer
//! and is untrusted: decoding returns [`Error`], never panics, and allocates no more than
//! the input size. [`serial`] is the guest end of a virtio-serial port carrying the frames;
//! [`ring`] carries them through shared memory on a UNIX-socket connection (the crypto
//! domain treats the mapping as hostile).

pub mod attr;
pub mod blocking;
pub mod codec;
mod error;
pub mod frame;
pub mod messages;
pub mod ring;
pub mod serial;
pub mod v32;

pub use codec::{Blob, Reader, Secret, Wire, from_bytes, to_bytes};
pub use error::Error;
pub use frame::{FrameDecoder, MAX_FRAME, encode_frame, frame_len};
pub use messages::*;

/// Encodes `msg` as one complete frame.
///
/// # Errors
/// [`Error::FrameTooLarge`].
pub fn frame_message<T: Wire>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    frame_message_into(msg, &mut out)?;
    Ok(out)
}

/// Appends `msg` as one complete frame to `out` (several frames can leave in one write).
/// On error `out` is left as it was.
///
/// # Errors
/// [`Error::FrameTooLarge`].
pub fn frame_message_into<T: Wire>(msg: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    msg.put(out);
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(Error::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Wire + PartialEq + std::fmt::Debug>(v: T) {
        let bytes = to_bytes(&v);
        assert_eq!(from_bytes::<T>(&bytes), Ok(v));
        // Every strict prefix is an error, never a panic.
        for n in 0..bytes.len() {
            assert!(from_bytes::<T>(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(Request::Hello {
            version: PROTOCOL_VERSION,
            app: [7; 16],
        });
        roundtrip(Request::Login {
            session: 5,
            user_type: 1,
            pin: Secret::new(b"1234".to_vec()),
        });
        roundtrip(Request::GenerateKeyPair {
            session: 1,
            mechanism: Mechanism {
                mechanism: 0x1040,
                param: MechParam::None {},
            },
            public_template: vec![Attr {
                ty: 0x180,
                value: Blob(vec![6, 8, 42]),
            }],
            private_template: vec![],
        });
        roundtrip(Request::Encrypt {
            session: 1,
            data: Blob(vec![1, 2, 3]),
            cap: None,
        });
        roundtrip(Request::SignOnce {
            session: 4,
            mechanism: Mechanism {
                mechanism: 0x1041,
                param: MechParam::None {},
            },
            key: 7,
            data: Blob(vec![0x5a; 32]),
        });
        roundtrip(Request::VerifyOnce {
            session: 4,
            mechanism: Mechanism {
                mechanism: 0x1057,
                param: MechParam::None {},
            },
            key: 8,
            data: Blob(vec![1]),
            signature: Blob(vec![2; 64]),
        });
        roundtrip(Request::EncryptOnce {
            session: 4,
            mechanism: Mechanism {
                mechanism: 0x1087,
                param: MechParam::Gcm {
                    iv: Blob(vec![0; 12]),
                    aad: Blob(vec![]),
                    tag_bits: 128,
                },
            },
            key: 9,
            data: Blob(vec![3; 10]),
        });
        roundtrip(Request::DecryptOnce {
            session: 4,
            mechanism: Mechanism {
                mechanism: 0x9,
                param: MechParam::None {},
            },
            key: 9,
            data: Blob(vec![3; 256]),
        });
        roundtrip(Request::MessageInit {
            session: 2,
            mechanism: Mechanism {
                mechanism: 0x1087,
                param: MechParam::None {},
            },
            key: 4,
            encrypt: true,
        });
        roundtrip(Request::EncryptMessage {
            session: 2,
            params: GcmMessageParams {
                iv: Blob(vec![1; 12]),
                iv_fixed_bits: 32,
                generator: 2,
                tag: Blob(vec![]),
                tag_bits: 128,
            },
            aad: Blob(vec![5]),
            data: Blob(vec![6; 3]),
            cap: Some(3),
        });
        roundtrip(Request::MessageFinal {
            session: 2,
            encrypt: false,
        });
        roundtrip(Request::DecryptInit {
            session: 9,
            mechanism: Mechanism {
                mechanism: 0x1087,
                param: MechParam::Gcm {
                    iv: Blob(vec![0; 12]),
                    aad: Blob(vec![]),
                    tag_bits: 128,
                },
            },
            key: 3,
        });
    }

    #[test]
    fn responses_roundtrip() {
        roundtrip(Response::ok(Body::Attrs {
            values: vec![
                AttrValue::Value {
                    value: Blob(vec![1]),
                },
                AttrValue::Sensitive {},
                AttrValue::Invalid {},
            ],
        }));
        roundtrip(Response::ok(Body::Token {
            info: TokenInfo {
                label: "t".into(),
                manufacturer: "caas".into(),
                model: "vsm".into(),
                serial: "1".into(),
                flags: 0x400,
                max_sessions: 0,
                session_count: 1,
                max_rw_sessions: 0,
                rw_session_count: 0,
                max_pin_len: 64,
                min_pin_len: 4,
            },
        }));
        roundtrip(Response::ok(Body::Sealed {
            iv: Blob(vec![1; 12]),
            tag: Blob(vec![2; 16]),
            data: Blob(vec![3; 5]),
        }));
        roundtrip(Response::rv(0x30));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        // Unknown tag.
        assert!(matches!(
            from_bytes::<Request>(&[200]),
            Err(Error::UnknownTag { .. })
        ));
        // A list claiming 4 billion elements does not allocate them.
        let mut b = vec![2u8];
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(from_bytes::<Body>(&b).is_err());
        // A blob longer than the input.
        let mut b = vec![3u8];
        b.extend_from_slice(&1000u32.to_le_bytes());
        assert!(from_bytes::<Body>(&b).is_err());
        // Bad bool.
        assert_eq!(from_bytes::<Request>(&[1, 2]), Err(Error::InvalidBool(2)));
        // Trailing bytes.
        assert!(matches!(
            from_bytes::<Request>(&[1, 0, 0]),
            Err(Error::TrailingBytes(1))
        ));
    }

    /// A deterministic stand-in for the cargo-fuzz target (fuzz/fuzz_targets/vsm_codec.rs)
    /// that runs in every CI build: random and mutated inputs never panic, and whatever
    /// decodes re-encodes to the same bytes.
    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = vec![
            to_bytes(&Request::Login {
                session: 1,
                user_type: 1,
                pin: Secret::new(b"1234".to_vec()),
            }),
            to_bytes(&Request::GenerateKeyPair {
                session: 2,
                mechanism: Mechanism {
                    mechanism: 0x1050,
                    param: MechParam::Ecdh {
                        kdf: 1,
                        shared_data: Blob(vec![1, 2]),
                        public_data: Blob(vec![4; 65]),
                    },
                },
                public_template: vec![Attr {
                    ty: 0x180,
                    value: Blob(vec![6, 8]),
                }],
                private_template: vec![],
            }),
            to_bytes(&Request::SignOnce {
                session: 3,
                mechanism: Mechanism {
                    mechanism: 0x1041,
                    param: MechParam::None {},
                },
                key: 5,
                data: Blob(vec![9; 32]),
            }),
            to_bytes(&Response::ok(Body::Attrs {
                values: vec![AttrValue::Sensitive {}, AttrValue::Invalid {}],
            })),
            to_bytes(&Request::DecryptMessageNext {
                session: 3,
                data: Blob(vec![1; 20]),
                tag: Blob(vec![2; 16]),
                end: true,
                cap: Some(20),
            }),
            to_bytes(&Response::ok(Body::Sealed {
                iv: Blob(vec![1; 12]),
                tag: Blob(vec![2; 16]),
                data: Blob(vec![3; 4]),
            })),
        ];
        for i in 0..200_000u32 {
            let mut input = if i % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                seeds[(i as usize / 2) % seeds.len()].clone()
            };
            if i % 2 == 1 && !input.is_empty() {
                for _ in 0..1 + next() % 3 {
                    let at = (next() as usize) % input.len();
                    input[at] = next() as u8;
                }
            }
            if let Ok(r) = from_bytes::<Request>(&input) {
                assert_eq!(to_bytes(&r), input);
            }
            if let Ok(r) = from_bytes::<Response>(&input) {
                assert_eq!(to_bytes(&r), input);
            }
            let mut d = FrameDecoder::new();
            d.feed(&input);
            while let Ok(Some(f)) = d.next_frame() {
                let _ = from_bytes::<Request>(&f);
            }
        }
    }

    #[test]
    fn frames_split_and_join() {
        let f1 = frame_message(&Request::GetSlotList {
            token_present: true,
        })
        .unwrap_or_default();
        let f2 = frame_message(&Request::GetSlotInfo { slot: 1 }).unwrap_or_default();
        let mut all = f1.clone();
        all.extend_from_slice(&f2);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &all {
            d.feed(std::slice::from_ref(b));
            while let Ok(Some(p)) = d.next_frame() {
                got.push(from_bytes::<Request>(&p));
            }
        }
        assert_eq!(
            got,
            vec![
                Ok(Request::GetSlotList {
                    token_present: true
                }),
                Ok(Request::GetSlotInfo { slot: 1 })
            ]
        );
        let mut d = FrameDecoder::new();
        d.feed(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(Error::FrameTooLarge { .. })));
    }
}
