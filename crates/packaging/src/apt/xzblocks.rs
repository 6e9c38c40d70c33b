//! One xz stream made of independently compressed blocks, so that an index
//! whose last chunk changed recompresses only that chunk.
//!
//! apt 2.6 reads only the first stream of a multi-stream `.xz` file, so the
//! chunks cannot simply be concatenated streams (as gzip members can). But
//! an xz stream is a header, any number of blocks, an index listing each
//! block's unpadded and uncompressed sizes, and a footer; blocks are
//! independent. [`compress_block`] compresses one chunk as a complete
//! single-block stream and keeps the block and its sizes; [`assemble`] writes
//! one stream [`header`], the cached blocks, a new index and footer
//! ([`trailer`]). Nothing old is recompressed. The format is the one of the xz file format
//! specification 1.1.0 (sections 2.1 to 4); `xz -t` and apt check it.

use std::io::Write;

/// One compressed block with what the stream index needs.
#[derive(Debug, Clone)]
pub struct Block {
    /// The block, padded to a multiple of 4, with its check.
    bytes: Vec<u8>,
    /// Block header + compressed data + check, without padding.
    unpadded: u64,
    /// Size of the chunk it holds.
    uncompressed: u64,
}

const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];

fn bad(what: &str) -> std::io::Error {
    std::io::Error::other(format!("unexpected xz encoder output: {what}"))
}

fn read_varint(data: &[u8], pos: &mut usize) -> std::io::Result<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let b = *data.get(*pos).ok_or_else(|| bad("index ends early"))?;
        *pos += 1;
        v |= u64::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("varint too long"))
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Compresses `data` (non-empty) into one block at `preset`.
pub fn compress_block(data: &[u8], preset: u32) -> std::io::Result<Block> {
    let mut enc = liblzma::write::XzEncoder::new(Vec::with_capacity(data.len() / 4 + 64), preset);
    enc.write_all(data)?;
    let stream = enc.finish()?;
    if stream.len() < 24 || stream[..6] != HEADER_MAGIC || &stream[stream.len() - 2..] != b"YZ" {
        return Err(bad("not an xz stream"));
    }
    if stream[6..8] != FLAGS {
        return Err(bad("check type is not CRC64"));
    }
    let footer = &stream[stream.len() - 12..];
    let backward = u32::from_le_bytes([footer[4], footer[5], footer[6], footer[7]]);
    let index_size = (backward as usize + 1) * 4;
    let index_start = stream
        .len()
        .checked_sub(12 + index_size)
        .ok_or_else(|| bad("index size"))?;
    let index = &stream[index_start..stream.len() - 12];
    if index.first() != Some(&0) {
        return Err(bad("index indicator"));
    }
    let mut pos = 1;
    if read_varint(index, &mut pos)? != 1 {
        return Err(bad("expected exactly one block"));
    }
    let unpadded = read_varint(index, &mut pos)?;
    let uncompressed = read_varint(index, &mut pos)?;
    if uncompressed != data.len() as u64 {
        return Err(bad("uncompressed size"));
    }
    let padded = unpadded.div_ceil(4) * 4;
    let end = 12 + padded as usize;
    if end != index_start {
        return Err(bad("block size"));
    }
    Ok(Block {
        bytes: stream[12..end].to_vec(),
        unpadded,
        uncompressed,
    })
}

/// The stream flags of every block: check CRC64 (liblzma's default).
const FLAGS: [u8; 2] = [0x00, 0x04];

/// The stream header (12 bytes).
pub fn header() -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&HEADER_MAGIC);
    out.extend_from_slice(&FLAGS);
    out.extend_from_slice(&crc32fast::hash(&FLAGS).to_le_bytes());
    out
}

/// The stream index and footer after `blocks`.
pub fn trailer(blocks: &[&Block]) -> Vec<u8> {
    let mut index = vec![0u8];
    write_varint(&mut index, blocks.len() as u64);
    for b in blocks {
        write_varint(&mut index, b.unpadded);
        write_varint(&mut index, b.uncompressed);
    }
    while index.len() % 4 != 0 {
        index.push(0);
    }
    let crc = crc32fast::hash(&index);
    index.extend_from_slice(&crc.to_le_bytes());
    let backward = (index.len() / 4 - 1) as u32;
    let mut tail = Vec::with_capacity(6);
    tail.extend_from_slice(&backward.to_le_bytes());
    tail.extend_from_slice(&FLAGS);
    index.extend_from_slice(&crc32fast::hash(&tail).to_le_bytes());
    index.extend_from_slice(&tail);
    index.extend_from_slice(b"YZ");
    index
}

/// One xz stream holding `blocks` in order (an empty stream if none).
pub fn assemble(blocks: &[&Block]) -> Vec<u8> {
    let size: usize = blocks.iter().map(|b| b.bytes.len()).sum();
    let mut out = Vec::with_capacity(size + 64 + blocks.len() * 8);
    out.extend_from_slice(&header());
    for b in blocks {
        out.extend_from_slice(&b.bytes);
    }
    out.extend_from_slice(&trailer(blocks));
    out
}

impl Block {
    /// The block's bytes as they go into the stream.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;

    fn decode(xz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        liblzma::read::XzDecoder::new(xz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn blocks_make_one_valid_stream() {
        let chunks: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                (0..(1000 + i * 777))
                    .flat_map(|j| format!("Package: p{i}-{j}\n").into_bytes())
                    .collect()
            })
            .collect();
        let blocks: Vec<Block> = chunks
            .iter()
            .map(|c| compress_block(c, 0).unwrap())
            .collect();
        let xz = assemble(&blocks.iter().collect::<Vec<_>>());
        assert_eq!(decode(&xz), chunks.concat());
        // A single stream: the decoder that stops after the first stream sees everything.
        let mut single = Vec::new();
        liblzma::read::XzDecoder::new_stream(
            &xz[..],
            liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0).unwrap(),
        )
        .read_to_end(&mut single)
        .unwrap();
        assert_eq!(single, chunks.concat());
        // Real xz agrees, when installed.
        if let Ok(mut child) = std::process::Command::new("xz")
            .args(["-t", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            child.stdin.take().unwrap().write_all(&xz).unwrap();
            assert!(child.wait().unwrap().success(), "xz -t refuses the stream");
        }
        assert_eq!(decode(&assemble(&[])), b"");
    }
}
