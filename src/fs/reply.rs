//! The replies: each operation's result reaches the kernel here, its error
//! through the one conversion `Error` -> `Errno`.

use crate::session::{
    FileHandle, ReplyAttr, ReplyCreate, ReplyData, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyWrite, ReplyXattr,
};

use std::time::Duration;

use super::{attr, namespace, open};
use crate::error::Error;

pub(super) fn reply_empty(reply: ReplyEmpty, result: Result<(), Error>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e.into()),
    }
}

/// `ttl`: how long the kernel may keep the attributes (`attr::TTL`, or
/// none: `MigsafeFs::attr_ttl`).
pub(super) fn reply_entry(
    reply: ReplyEntry,
    result: Result<crate::session::FileAttr, Error>,
    ttl: Duration,
) {
    match result {
        Ok(a) => reply.entry(attr::ENTRY_TTL, ttl, &a),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_attr(
    reply: ReplyAttr,
    result: Result<crate::session::FileAttr, Error>,
    ttl: Duration,
) {
    match result {
        Ok(a) => reply.attr(ttl, &a),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_data<D: AsRef<[u8]>>(reply: ReplyData, result: Result<D, Error>) {
    match result {
        Ok(d) => reply.data(d.as_ref()),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_written(reply: ReplyWrite, result: Result<u32, Error>) {
    match result {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_offset(reply: ReplyLseek, result: Result<i64, Error>) {
    match result {
        Ok(off) => reply.offset(off),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_open(reply: ReplyOpen, result: Result<open::Opened, Error>) {
    match result {
        Ok((fh, fopen, Some(pt))) => reply.opened(FileHandle(fh), fopen, Some(&pt.id)),
        Ok((fh, fopen, None)) => reply.opened(FileHandle(fh), fopen, None),
        Err(e) => reply.error(e.into()),
    }
}

/// A create reply has one TTL for the new name and its attributes: the
/// name's (`ENTRY_TTL`) wins, the attributes are asked for again once.
pub(super) fn reply_create(reply: ReplyCreate, result: Result<open::Created, Error>) {
    match result {
        Ok((attr, fh, fopen, pt)) => reply.created(
            attr::ENTRY_TTL,
            &attr,
            FileHandle(fh),
            fopen,
            pt.as_ref().map(|p| &p.id),
        ),
        Err(e) => reply.error(e.into()),
    }
}

pub(super) fn reply_xattr(reply: ReplyXattr, result: Result<namespace::Xattr, Error>) {
    match result {
        Ok(namespace::Xattr::Size(n)) => reply.size(n),
        Ok(namespace::Xattr::Data(d)) => reply.data(&d),
        Err(e) => reply.error(e.into()),
    }
}
