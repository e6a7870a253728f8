//! The offline store over HTTPS: an S3 server (moto) whose certificate a
//! private CA signed is reached with `ca_file`, and refused without it or
//! with another CA.

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use quiver_core::storage::{open_store, CA_FILE_OPTION};
use quiver_core::ErrorKind;
use quiver_testkit::{Pki, S3Server};

fn with_ca(s3: &S3Server, ca: &std::path::Path) -> Vec<(String, String)> {
    let mut options = s3.options();
    options.push((CA_FILE_OPTION.to_owned(), ca.display().to_string()));
    options
}

async fn round_trip(store: &dyn ObjectStore, root: &Path) -> object_store::Result<Vec<u8>> {
    let path = root.clone().join("probe.txt");
    store
        .put(&path, PutPayload::from_static(b"over tls"))
        .await?;
    Ok(store.get(&path).await?.bytes().await?.to_vec())
}

#[tokio::test]
async fn s3_over_https_with_a_private_ca() {
    let pki = Pki::new();
    let s3 = S3Server::start_tls(&pki);
    s3.create_bucket("lake");
    assert!(s3.endpoint().starts_with("https://"));

    let (store, root) = open_store("s3://lake/offline", &with_ca(&s3, &pki.ca_file())).unwrap();
    assert_eq!(
        round_trip(store.as_ref(), &root).await.unwrap(),
        b"over tls"
    );

    // The system's roots do not know the private CA; nor does another CA.
    let (store, root) = open_store("s3://lake/offline", &s3.options()).unwrap();
    let e = round_trip(store.as_ref(), &root).await.unwrap_err();
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    let other = Pki::new();
    let (store, root) = open_store("s3://lake/offline", &with_ca(&s3, &other.ca_file())).unwrap();
    let e = round_trip(store.as_ref(), &root).await.unwrap_err();
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
}

#[test]
fn ca_file_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let opt = |p: &std::path::Path| vec![(CA_FILE_OPTION.to_owned(), p.display().to_string())];
    let cases = [
        (
            "s3://lake/x",
            opt(&missing),
            "cannot read the storage CA file",
        ),
        ("s3://lake/x", opt(&garbage), "holds no PEM certificate"),
        (
            dir.path().to_str().unwrap(),
            opt(&garbage),
            "applies to s3:// locations",
        ),
    ];
    for (location, options, want) in cases {
        let e = open_store(location, &options).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains(want), "{e}");
    }
    // Options are read as without ca_file (object_store's parse_url_opts):
    // any case, unknown keys ignored.
    let pki = Pki::new();
    let mut options = vec![
        ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
        ("aws_no_such_option".to_owned(), "1".to_owned()),
    ];
    options.extend(opt(&pki.ca_file()));
    open_store("s3://lake/x", &options).unwrap();
}
