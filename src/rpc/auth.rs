//! Which user a request acts as: the `Authorization: Basic base64(user:)` username (the password
//! is ignored, as in envd), else the sandbox's default user.

use base64::Engine;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::session::Defaults;
use crate::users::{self, User};

/// The user [`known_basic_user`] resolved for a request, so handlers do not look it up again.
#[derive(Clone)]
struct BasicUser(User);

/// The user a request acts as. An unknown or unparsable user is `unauthenticated`, naming it.
pub(crate) fn request_user<T>(request: &tonic::Request<T>, defaults: &Defaults) -> Result<User, Status> {
    if let Some(BasicUser(user)) = request.extensions().get() {
        return Ok(user.clone());
    }
    match basic_username(request.metadata())? {
        Some(name) => lookup_basic(&name),
        None if defaults.user.is_empty() => Err(unauthenticated("no user specified".to_owned())),
        None => users::lookup(&defaults.user)
            .map_err(|e| unauthenticated(format!("invalid default user: '{}': {e}", defaults.user))),
    }
}

/// Interceptor on every RPC: a Basic-auth username that names no user is `unauthenticated`,
/// whether or not the method acts as a user (envd's authn middleware runs for every request).
pub(crate) fn known_basic_user(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
    if let Some(name) = basic_username(request.metadata())? {
        let user = lookup_basic(&name)?;
        request.extensions_mut().insert(BasicUser(user));
    }
    Ok(request)
}

/// The user a Basic `Authorization` header names; unknown is `unauthenticated`, naming it.
fn lookup_basic(name: &str) -> Result<User, Status> {
    users::lookup(name).map_err(|e| unauthenticated(format!("invalid username: '{name}': {e}")))
}

/// The username of a Basic `Authorization` header; `None` when there is no Basic header.
fn basic_username(md: &MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = md.get("authorization") else { return Ok(None) };
    let value = value.to_str().map_err(|_| unauthenticated("authorization header is not ASCII".to_owned()))?;
    let Some(encoded) = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic ")) else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| unauthenticated("authorization header is not valid base64 'user:password'".to_owned()))?;
    let name = decoded.split_once(':').map_or(decoded.as_str(), |(user, _password)| user);
    Ok(Some(name.to_owned()))
}

fn unauthenticated(message: String) -> Status {
    Status::unauthenticated(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert("authorization", value.parse().unwrap());
        md
    }

    #[test]
    fn username_comes_from_basic_auth() {
        assert_eq!(basic_username(&with_auth("Basic dXNlcjo=")).unwrap().as_deref(), Some("user"));
        assert_eq!(basic_username(&with_auth("Basic cm9vdDpwdw==")).unwrap().as_deref(), Some("root"));
        assert_eq!(basic_username(&with_auth("Basic Og==")).unwrap().as_deref(), Some(""));
        assert_eq!(basic_username(&with_auth("Bearer abc")).unwrap(), None);
        assert_eq!(basic_username(&MetadataMap::new()).unwrap(), None);
        assert!(basic_username(&with_auth("Basic !!!")).is_err());
    }

    fn request(md: MetadataMap) -> tonic::Request<()> {
        tonic::Request::from_parts(md, tonic::Extensions::new(), ())
    }

    #[test]
    fn unknown_users_are_unauthenticated() {
        let defaults = Defaults { user: "root".into(), workdir: None, env: vec![] };
        let err = request_user(&request(with_auth("Basic bm9zdWNodXNlcjo=")), &defaults).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("'nosuchuser'"), "{}", err.message());
        assert_eq!(request_user(&request(MetadataMap::new()), &defaults).unwrap().name, "root");
        let empty = Defaults { user: String::new(), ..defaults };
        let err = request_user(&request(MetadataMap::new()), &empty).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn the_interceptor_resolves_the_user_once_for_the_handler() {
        let defaults = Defaults { user: "nobody-guestd-default".into(), workdir: None, env: vec![] };
        let intercepted = known_basic_user(request(with_auth("Basic cm9vdDo="))).unwrap();
        assert!(intercepted.extensions().get::<BasicUser>().is_some());
        assert_eq!(request_user(&intercepted, &defaults).unwrap().name, "root");
        assert_eq!(
            known_basic_user(request(with_auth("Basic bm9zdWNodXNlcjo="))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
