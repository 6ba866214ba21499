//! The two-host LUN bed: two loop devices over one image file stand for
//! host A and host B of one SAN LUN, each with a migsafe mount serving it as
//! `disk` (docs/DESIGN.md §1).

use std::fs;

use super::{LoopDev, Mount, Scratch, make_file, scratch};

pub struct LoopBed {
    /// Declared first: mounts go before the devices they serve, the temp
    /// dir last.
    pub a: Mount,
    pub b: Mount,
    pub loop_a: LoopDev,
    pub loop_b: LoopDev,
    pub dir: Scratch,
}

impl LoopBed {
    /// A `mib`-MiB image of `A` bytes; `args_a`/`args_b` are extra mount
    /// arguments of host A and host B.
    pub fn new(mib: usize, args_a: &[&str], args_b: &[&str]) -> LoopBed {
        let dir = scratch();
        let img = dir.path().join("shared.img");
        make_file(&img, mib << 20, b'A');
        let loop_a = LoopDev::attach(&img);
        let loop_b = LoopDev::attach(&img);
        let mount = |tag: &str, lo: &LoopDev, extra: &[&str]| {
            let back = dir.path().join(format!("back-{tag}"));
            fs::create_dir(&back).unwrap();
            let dev = format!("disk={}", lo.path.display());
            let mut args = vec!["--device", dev.as_str()];
            args.extend_from_slice(extra);
            Mount::start(dir.path(), &back, &args)
        };
        let a = mount("a", &loop_a, args_a);
        let b = mount("b", &loop_b, args_b);
        LoopBed {
            a,
            b,
            loop_a,
            loop_b,
            dir,
        }
    }
}
