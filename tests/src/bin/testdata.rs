//! Writes test and benchmark studies as DICOM Part 10 files.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use kakehashi_systest::testdata::{self, Name, Syntax};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// CT, 300 × 512 KiB, explicit VR LE
    Ct,
    /// Breast MR, 1200 × 128 KiB, explicit VR LE
    Mr,
    /// Mammography, 4 × 27 MiB, explicit VR LE
    Mg,
    /// Several modalities and transfer syntaxes, Japanese names (ISO_IR 192, ISO 2022 IR 87)
    Varied,
}

/// Generate DICOM studies for tests, the demo and benchmarks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which study to write.
    #[arg(value_enum)]
    preset: Preset,
    /// Output directory (created).
    #[arg(long, short)]
    out: PathBuf,
    /// Override the number of instances.
    #[arg(long)]
    count: Option<usize>,
    /// Override the pixel data size per instance, in bytes.
    #[arg(long)]
    size: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (tag, modality, class, count, size) = match a.preset {
        Preset::Ct => ("ct", "CT", testdata::CT_IMAGE, 300, 512 * 1024),
        Preset::Mr => ("mr", "MR", testdata::MR_IMAGE, 1200, 128 * 1024),
        Preset::Mg => ("mg", "MG", testdata::MG_IMAGE, 4, 27 * 1024 * 1024),
        Preset::Varied => {
            let files = testdata::varied_set(&a.out)?;
            println!("wrote {} files under {}", files.len(), a.out.display());
            return Ok(());
        }
    };
    let files = testdata::study(
        &a.out,
        tag,
        modality,
        class,
        Syntax::ExplicitLe,
        Name::Utf8,
        a.count.unwrap_or(count),
        a.size.unwrap_or(size),
    )?;
    println!("wrote {} files under {}", files.len(), a.out.display());
    Ok(())
}
