//! Fuzzes metadata entries and slots of both format versions (untrusted: they come from
//! the storage host) and the slot selection of the write path.
#![no_main]
use caas_volume::entry::{Entry, Slot, choose_target};
use caas_volume::{SLOTS, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for v in [Version::V1, Version::V2] {
        let e = Entry::decode_slice(data, v);
        let (idx, n) = e.candidates();
        assert!(n <= SLOTS);
        for w in idx[..n].windows(2) {
            let c = |i: usize| e.slots[i].map_or((0, 0), |s| s.order());
            assert!(c(w[0]) >= c(w[1]));
        }
        let hint = data.first().copied().unwrap_or(0) as usize;
        let cur = (hint & 3 < 3).then_some(hint & 3);
        let com = ((hint >> 2) & 3 < 3).then_some((hint >> 2) & 3);
        let t = choose_target(&e, cur, com);
        assert!(t < SLOTS && Some(t) != cur && Some(t) != com);
        let ss = v.slot_size();
        if data.len() >= ss {
            if let Some(s) = Slot::decode(&data[..ss], v) {
                assert_eq!(s.encode(v), &data[..ss]);
            }
        }
    }
});
